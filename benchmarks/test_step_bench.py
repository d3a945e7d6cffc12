"""pytest-benchmark suite of one training step per method: the same cases as `rkd-fast bench`
(rkd_fast.bench.steps), timed by pytest-benchmark.

    pytest benchmarks/test_step_bench.py --benchmark-only [--benchmark-group-by=param:teacher]

Small models by default so the suite runs on a CPU: ResNet-18 of width RKD_FAST_BENCH_WIDTH (default 16 on CPU,
64 on CUDA), batch RKD_FAST_BENCH_BATCH (default 16 on CPU, 128 on CUDA), CIFAR shapes, against a teacher of the
student's size ("same") and a WideResNet-34 ("wrn", widen factor RKD_FAST_BENCH_WIDEN, default 2 on CPU, 10 on
CUDA). Methods not registered in rkd_fast.train.methods are skipped with a reason."""

import os

import pytest
import torch

from rkd_fast.bench import steps

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
WIDTH = int(os.environ.get("RKD_FAST_BENCH_WIDTH", 64 if CUDA else 16))
BATCH = int(os.environ.get("RKD_FAST_BENCH_BATCH", 128 if CUDA else 16))
WIDEN = int(os.environ.get("RKD_FAST_BENCH_WIDEN", 10 if CUDA else 2))
PRECISION = "bf16" if CUDA else "fp32"
STUDENT = steps.ModelSpec("resnet18", {"width": WIDTH})
TEACHERS = {"same": STUDENT, "wrn": steps.ModelSpec("wide_resnet34_10", {"widen_factor": WIDEN})}


@pytest.mark.parametrize("variant", list(steps.variants()))
@pytest.mark.parametrize("teacher", list(TEACHERS))
def test_training_step(benchmark, teacher, variant):
    if not steps.uses_teacher(variant) and teacher != "same":
        pytest.skip("the method does not use the teacher: measured with teacher=same")
    scenario = steps.Scenario(teacher, STUDENT, TEACHERS[teacher], BATCH, 32)
    torch.manual_seed(0)
    student = scenario.student.build(DEVICE, CUDA)
    teacher_model = scenario.teacher.build(DEVICE, CUDA).eval().requires_grad_(False)
    x, y = steps.make_batch(scenario, DEVICE, CUDA)
    case = steps.StepCase(variant, student, teacher_model, x, y, scenario, precision=PRECISION)
    case.step()  # warm up outside the timing

    def run():
        case.step()
        steps.synchronize(DEVICE)

    try:
        benchmark.pedantic(run, rounds=3, iterations=1)
    finally:
        case.close()
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.median
