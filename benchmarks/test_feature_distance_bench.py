"""pytest-benchmark suite of rkd_fast.feature_distance (forward + backward) against the eager reference and
torch.compile(reference). Runs the same cases as `python -m rkd_fast.bench.ops`.

    pytest benchmarks/test_feature_distance_bench.py --benchmark-only [--benchmark-group-by=param:shape]

CIFAR shapes by default; RKD_FAST_BENCH_SUITE=imagenet|all for the ResNet-50 shapes (slow on CPU)."""

import os

import pytest
import torch

import rkd_fast
from rkd_fast.bench import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = ops.SUITES[os.environ.get("RKD_FAST_BENCH_SUITE", "cifar")]


@pytest.mark.parametrize("impl", ops.IMPLS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_feature_distance_fwd_bwd(benchmark, shape, dtype, impl):
    if impl in ("cuda", "triton") and rkd_fast.backends()["feature_distance"][impl] != "available":
        pytest.skip(f"backend {impl!r} {rkd_fast.backends()['feature_distance'][impl]}")
    student, teacher = ops.make_inputs(shape, ops.DTYPES[dtype], DEVICE)
    step = ops.forward_backward(impl)
    step(student, teacher)  # compile / warm up outside the timing

    def run():
        step(student, teacher)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(run)
    nbytes = 3 * student.numel() * student.element_size()
    benchmark.extra_info["effective_GBps"] = nbytes / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["copy_GBps"] = ops.copy_bandwidth(student.numel(), student.dtype, DEVICE) / 1e9
