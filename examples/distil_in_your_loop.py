"""Robust knowledge distillation inside your own PyTorch training loop.

Your models, your optimizer, your loop: rkd_fast.RobustKDLoss only computes the loss of a step (cross-entropy,
KD on the teacher's soft labels and feature-map matching at the student's adversarial point; the
finite-difference input-Jacobian term on request), and rkd_fast.evaluate measures the result. Runs in well under a minute on a laptop CPU, on scikit-learn's digits:

    python examples/distil_in_your_loop.py
"""

import torch
import torch.nn.functional as F
from torch import nn

import rkd_fast
from rkd_fast.attacks import pgd
from rkd_fast.datasets import load_digits

EPS = 0.1  # L∞ radius on the [0, 1] pixel scale


def small_cnn(width):
    """Any nn.Module that takes inputs in [0, 1] and returns logits will do; keep the normalisation inside."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),  # 8×8 -> 4×4
        nn.Flatten(), nn.Linear(2 * width * 16, 10))


def batches(x, y, size, generator):
    order = torch.randperm(len(x), generator=generator)
    for start in range(0, len(x), size):
        index = order[start:start + size]
        yield x[index], y[index]


def main():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test")

    # 1. A robust teacher: a few epochs of PGD adversarial training (rkd_fast.attacks.pgd crafts the inputs).
    teacher = small_cnn(32)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for epoch in range(4):
        for x, y in batches(x_train, y_train, 128, generator):
            x_adv = pgd(teacher, x, y, EPS, EPS / 4, 5, seed=epoch)  # eval mode inside, train mode restored
            loss = F.cross_entropy(teacher(x_adv), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    teacher.eval()

    # 2. A smaller student distilled with RobustKDLoss, the trainer's recipe (docs/frontier.md): with eps, every
    #    term is evaluated at the student's single-step adversarial point in the L∞ ball (cross-entropy, the
    #    teacher's soft labels at T = 1, feature maps). Feature pairs name modules of each model (here the second
    #    ReLU of both); where the shapes differ the loss makes an adapter, so give the optimizer its parameters too.
    student = small_cnn(8)
    loss_fn = rkd_fast.RobustKDLoss(
        student, teacher, feature_pairs=[("5", "5")], example_input=x_train[:8], eps=EPS,
        kd_weight=1.0, kd_temperature=1.0, feat_weight=1.0, jac_weight=0.0)
    optimizer = torch.optim.SGD([*student.parameters(), *loss_fn.parameters()], lr=0.05, momentum=0.9)
    step = 0
    for epoch in range(6):
        for x, y in batches(x_train, y_train, 128, generator):
            # Mixed precision is the usual autocast (on a GPU: "cuda", and a GradScaler for float16). The loss
            # comes back in float32; the fused ops accumulate in float32 whatever their inputs. The seed fixes
            # the adversarial point's random start, so a rerun gives the same numbers.
            with torch.autocast("cpu", dtype=torch.bfloat16):
                total, terms = loss_fn(x, y, seed=step)  # terms: detached "ce", "kd", "feat", "total"
            step += 1
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: " + ", ".join(f"{name} {value.item():.3f}" for name, value in terms.items()))
    student.eval()

    # 3. Robust accuracy of both, L∞ eps 0.1 on the 360 test digits (FGSM and PGD-20 here; add "autoattack").
    for name, model in (("teacher", teacher), ("student", student)):
        results = rkd_fast.evaluate(model, (x_test, y_test), attacks=["clean", "fgsm", "pgd20"], eps=EPS)
        print(f"{name}: " + ", ".join(f"{attack} {acc:.1%}" for attack, acc in results.items()))


if __name__ == "__main__":
    main()
