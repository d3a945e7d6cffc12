"""PGD-20 over one batch on a ResNet-18 (CIFAR layout): rkd_fast.attacks.pgd against torchattacks.PGD with the
same eps, alpha, steps and start, CPU fp32.

    pytest benchmarks/test_attack_bench.py                  # both timings and the side-by-side ratio
    RKD_BENCH_WIDTH=64 RKD_BENCH_BATCH=64 pytest ...       # the full-width ResNet-18 (slow on CPU)

The model is width-reduced by default (ResNet-18's layout with 16 base channels instead of 64) so the suite
stays within seconds on 2 cores; the comparison is between two attack loops over the same model."""

import os
import time

import pytest
import torch

from rkd_fast.attacks import pgd
from rkd_fast.models import build_model

torchattacks = pytest.importorskip("torchattacks")

WIDTH = int(os.environ.get("RKD_BENCH_WIDTH", "16"))
BATCH = int(os.environ.get("RKD_BENCH_BATCH", "32"))
EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 20


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model("resnet18", width=WIDTH).eval()
    x = torch.rand(BATCH, 3, 32, 32)
    y = torch.randint(0, 10, (BATCH,))
    return model, x, y


def ours(model, x, y):
    return pgd(model, x, y, EPS, ALPHA, STEPS, random_start=True, seed=0)


def theirs(model, x, y):
    return torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)(x, y)


def test_pgd20_rkd_fast(benchmark, setup):
    model, x, y = setup
    benchmark.pedantic(ours, args=setup, rounds=3, warmup_rounds=1)


def test_pgd20_torchattacks(benchmark, setup):
    model, x, y = setup
    benchmark.pedantic(theirs, args=setup, rounds=3, warmup_rounds=1)


def test_pgd20_not_slower_than_torchattacks(setup):
    """Interleaved runs (so load on the machine hits both alike); the best of each is compared."""
    ours(*setup), theirs(*setup)  # warm-up
    times = {ours: [], theirs: []}
    for _ in range(3):
        for attack in (ours, theirs):
            start = time.perf_counter()
            attack(*setup)
            times[attack].append(time.perf_counter() - start)
    ratio = min(times[ours]) / min(times[theirs])
    print(f"\nPGD-20, resnet18(width={WIDTH}), batch {BATCH}, CPU fp32: rkd_fast {min(times[ours]):.3f} s, "
          f"torchattacks {min(times[theirs]):.3f} s, ratio {ratio:.3f}")
    assert ratio <= 1.10  # "not slower", with 10% for timing noise on a shared machine
