"""The fused loss ops, rkd_fast.feature_distance and rkd_fast.fd_jacobian_loss, inside a torch.compile'd step.

Both are torch.library custom ops with fake (meta) implementations and registered backwards, so
torch.compile(fullgraph=True) traces them as single nodes: no graph break, and the compiled step calls the
same fused C++ (CPU) / CUDA / Triton kernel as eager mode. Here a small student learns from a teacher on digits
through a feature-map term and a finite-difference Jacobian-matching term, eager and compiled side by side.

    python examples/fused_losses.py       # the first compiled call takes a while: Inductor generates C++ code
"""

import time

import torch
import torch.nn.functional as F
from torch import nn

import rkd_fast
from rkd_fast.datasets import load_digits

H = 0.3  # the finite-difference step, L2 on the [0, 1] pixel scale (a robustness-scale step, as the trainer's)


class Net(nn.Module):
    """Returns the last feature map and the logits: the two things the losses compare."""

    def __init__(self, width):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, 32, 3, padding=1, stride=2), nn.ReLU())  # (N, 32, 4, 4)
        self.head = nn.Linear(32 * 16, 10)

    def forward(self, x):
        feature = self.features(x)
        return feature, self.head(feature.flatten(1))


def distillation_loss(student, teacher, x, y, direction):
    """CE + feature distance + Jacobian matching along `direction` (one unit-L2 direction per sample)."""
    x_pert = x + H * direction
    s_feat, s_logits = student(x)
    _, s_pert = student(x_pert)
    with torch.no_grad():
        t_feat, t_logits = teacher(x)
        _, t_pert = teacher(x_pert)
    feat = rkd_fast.feature_distance(s_feat, t_feat, mode="normalized")  # ‖s/‖s‖ − t/‖t‖‖² per sample, mean
    jac = rkd_fast.fd_jacobian_loss(s_logits, s_pert, H, t_clean=t_logits, t_pert=t_pert)  # ‖ΔS/h − ΔT/h‖²
    return F.cross_entropy(s_logits, y) + feat + jac, (feat.detach(), jac.detach())


def main():
    torch.manual_seed(0)
    x, y = load_digits("train")
    x, y = x[:512], y[:512]
    teacher, student = Net(16).eval(), Net(8)
    direction = torch.randn_like(x)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    # The same loss, eager and compiled in one graph (fullgraph=True fails on any graph break).
    compiled = torch.compile(distillation_loss, fullgraph=True)
    eager_loss, (feat, jac) = distillation_loss(student, teacher, x, y, direction)
    start = time.perf_counter()
    compiled_loss, _ = compiled(student, teacher, x, y, direction)
    print(f"first compiled call: {time.perf_counter() - start:.1f} s (tracing and code generation)")
    print(f"loss eager {eager_loss.item():.6f}, compiled {compiled_loss.item():.6f} "
          f"(feature {feat.item():.4f}, jacobian {jac.item():.4f})")
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)

    # Gradients agree too: the ops' registered backwards run inside the compiled graph.
    eager_grads = torch.autograd.grad(eager_loss, list(student.parameters()))
    compiled_grads = torch.autograd.grad(compiled_loss, list(student.parameters()))
    for eager_grad, compiled_grad in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-3, atol=1e-5)
    print("gradients: compiled == eager")

    # A few compiled training steps.
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    for step in range(20):
        loss, (feat, jac) = compiled(student, teacher, x, y, direction)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    print(f"after 20 compiled steps: loss {loss.item():.4f} (feature {feat.item():.4f}, jacobian {jac.item():.4f})")
    print("kernels:", {op: entry["auto (cpu)"] for op, entry in rkd_fast.backends().items()})


if __name__ == "__main__":
    main()
