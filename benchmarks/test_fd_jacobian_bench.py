"""Benchmark of rkd_fast.fd_jacobian_loss (forward + backward) against the eager reference
(rkd_fast.ops._reference.fd_jacobian, the tests' oracle): N 16-512, K 10-1000, on logits and probs, with and
without a teacher, fp32.

    pytest benchmarks/test_fd_jacobian_bench.py --benchmark-only [--benchmark-group-by=param:shape]
    python benchmarks/test_fd_jacobian_bench.py [--quick]   # (PYTHONPATH=. without an install) a table

The table times the two implementations side by side (rkd_fast.bench.ops.side_by_side): each round calls one,
then the other, and each call is timed by itself; a row reports the median over the rounds. Medians of single
calls, rather than means of blocks, because on a shared machine a call now and then waits milliseconds for a
descheduled thread (ATen's softmax enters a parallel region even for 16 x 10), which a mean would charge to
whichever implementation it hit.

On CPU "rkd_fast" is the C++ kernel (skipped with the reason when it is not built); on a GPU it is whatever
backend="auto" picks there (see rkd_fast.backends())."""

import functools
import itertools
import sys

import pytest
import torch

import rkd_fast
from rkd_fast.bench.ops import side_by_side
from rkd_fast.ops._reference import fd_jacobian as reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCHES = (16, 64, 256, 512)
CLASSES = (10, 100, 1000)
SHAPES = list(itertools.product(BATCHES, CLASSES))
ON = ("logits", "probs")
IMPLS = ("rkd_fast", "eager")


def make_inputs(shape, dtype=torch.float32, device=DEVICE, seed=0, teacher=True):
    gen = torch.Generator().manual_seed(seed)
    s_clean = torch.randn(shape, generator=gen)
    s_pert = s_clean + 0.05 * torch.randn(shape, generator=gen)
    t_clean = torch.randn(shape, generator=gen)
    t_pert = t_clean + 0.05 * torch.randn(shape, generator=gen)
    students = [x.to(device=device, dtype=dtype).requires_grad_() for x in (s_clean, s_pert)]
    teachers = [x.to(device=device, dtype=dtype) for x in (t_clean, t_pert)] if teacher else [None, None]
    return (*students, *teachers)


def forward_backward(impl, on):
    def step(s_clean, s_pert, t_clean, t_pert):
        if impl == "rkd_fast":
            loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.05, t_clean=t_clean, t_pert=t_pert, on=on)
        else:
            loss = reference(s_clean, s_pert, 0.05, t_clean, t_pert, on=on)
        return torch.autograd.grad(loss, (s_clean, s_pert))
    return step


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _skip_reason(impl):
    if impl == "rkd_fast" and DEVICE == "cpu":
        status = rkd_fast.backends()["fd_jacobian"]["cpu"]
        if status != "available":
            return f"backend 'cpu' {status}"
    return None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("teacher", (True, False), ids=("matching", "penalty"))
@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fd_jacobian_fwd_bwd(benchmark, shape, on, teacher, impl):
    reason = _skip_reason(impl)
    if reason:
        pytest.skip(reason)
    inputs = make_inputs(shape, teacher=teacher)
    step = forward_backward(impl, on)
    step(*inputs)  # warm up outside the timing

    def run():
        step(*inputs)
        _sync()

    benchmark(run)


def main(argv=()):
    quick = "--quick" in argv
    reason = _skip_reason("rkd_fast")
    if reason:
        print(f"rkd_fast: {reason}")
        return 1
    print(f"fd_jacobian_loss forward + backward, fp32, {DEVICE}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; median µs per call, the two timed in alternating rounds")
    print("| N × K | on | teacher | eager µs | fused µs | fused × vs eager |")
    print("|---|---|---|---|---|---|")
    worst = float("inf")
    for shape in ([(16, 10), (512, 1000)] if quick else SHAPES):
        for on, teacher in itertools.product(ON, (True, False)):
            inputs = make_inputs(shape, teacher=teacher)
            steps = [functools.partial(forward_backward(impl, on), *inputs) for impl in IMPLS]
            fused, eager = (spent[len(spent) // 2] for spent in side_by_side(steps, DEVICE, min_run_time=0.4))
            worst = min(worst, eager / fused)
            print(f"| {shape[0]} × {shape[1]} | {on} | {'yes' if teacher else 'no'} | {eager * 1e6:.1f} | "
                  f"{fused * 1e6:.1f} | {eager / fused:.2f} |", flush=True)
    print(f"smallest speed-up: {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
