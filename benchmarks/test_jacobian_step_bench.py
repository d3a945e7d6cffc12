"""pytest-benchmark suite of a full robust-distillation training step with the Jacobian term: CE + KD + Jacobian,
forward + backward + SGD step, ResNet-18 (CIFAR stem) student and teacher, CIFAR shapes (3×32×32).

    pytest benchmarks/test_jacobian_step_bench.py --benchmark-only --benchmark-group-by=param:n

Steps compared (same student, teacher, batch and optimizer):
  kd              CE + KD only: the step the Jacobian term is added to
  fd              + rkd_fast.jacobian_penalty (finite differences, fused op)
  fd_fraction0.25 + the same term on a random quarter of the batch
  exact           + jacobian_penalty(estimator="exact"): double backprop, the same quantity (in train mode its
                  differentiated pass normalises with the clean batch statistics, one extra student forward)
The classic one-pass double backprop (differentiate the clean train-mode pass itself) does not run on this
student: the loss's backward needs a third derivative of batch_norm ("batch_norm does not support 3rd+ order
derivatives"); estimator="exact" differentiates a pass normalised with the recorded statistics instead.
N=64 ResNet-18 on a 2-core CPU takes seconds per step: rounds are few (RKD_FAST_BENCH_ROUNDS to change).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from rkd_fast import jacobian_penalty
from rkd_fast.models import build_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDS = {16: 3, 64: 2}
KD_TEMPERATURE = 4.0
JACOBIAN_WEIGHT = 1.0
STEPS = ("kd", "fd", "fd_fraction0.25", "exact")


def _kd(s, t):
    log_p = F.log_softmax(s / KD_TEMPERATURE, dim=1)
    return F.kl_div(log_p, F.softmax(t / KD_TEMPERATURE, dim=1), reduction="batchmean") * KD_TEMPERATURE ** 2


def make_step(name, student, teacher, optimizer):
    def step(x, y):
        if name == "kd":
            s = student(x)
            with torch.no_grad():
                t = teacher(x)
            term = 0.0
        else:
            estimator = "exact" if name == "exact" else "fd"
            fraction = 0.25 if name == "fd_fraction0.25" else 1.0
            term, s, t = jacobian_penalty(student, x, teacher=teacher, estimator=estimator, fraction=fraction,
                                          return_outputs=True)
        loss = F.cross_entropy(s, y) + _kd(s, t) + JACOBIAN_WEIGHT * term
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    return step


@pytest.mark.parametrize("step_name", STEPS)
@pytest.mark.parametrize("n", [16, 64])
def test_training_step(benchmark, n, step_name):
    torch.manual_seed(0)
    student = build_model("resnet18").to(DEVICE).train()
    teacher = build_model("resnet18").to(DEVICE).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(n, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 10, (n,), device=DEVICE)
    step = make_step(step_name, student, teacher, optimizer)
    rounds = int(os.environ.get("RKD_FAST_BENCH_ROUNDS", ROUNDS[n]))
    benchmark.pedantic(step, args=(x, y), rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["threads"] = torch.get_num_threads()
