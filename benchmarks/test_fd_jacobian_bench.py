"""Benchmark of rkd_fast.fd_jacobian_loss (forward + backward, Jacobian matching with a teacher) against the
eager reference (rkd_fast.ops._reference.fd_jacobian, the tests' oracle), fp32.

    pytest benchmarks/test_fd_jacobian_bench.py --benchmark-only [--benchmark-group-by=param:shape]
    python benchmarks/test_fd_jacobian_bench.py    # (PYTHONPATH=. without an install) the same cases with torch.utils.benchmark, as a table

On CPU "rkd_fast" is the C++ kernel (skipped with the reason when it is not built); on a GPU it is whatever
backend="auto" picks there (see rkd_fast.backends())."""

import pytest
import torch

import rkd_fast
from rkd_fast.ops._reference import fd_jacobian as reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(256, 10), (256, 100), (256, 1000), (1024, 1000)]
ON = ("logits", "probs")
IMPLS = ("rkd_fast", "eager")


def make_inputs(shape, dtype=torch.float32, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s_clean = torch.randn(shape, generator=gen)
    s_pert = s_clean + 0.05 * torch.randn(shape, generator=gen)
    t_clean = torch.randn(shape, generator=gen)
    t_pert = t_clean + 0.05 * torch.randn(shape, generator=gen)
    students = [x.to(device=device, dtype=dtype).requires_grad_() for x in (s_clean, s_pert)]
    return (*students, *(x.to(device=device, dtype=dtype) for x in (t_clean, t_pert)))


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
@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fd_jacobian_fwd_bwd(benchmark, shape, on, impl):
    reason = _skip_reason(impl)
    if reason:
        pytest.skip(reason)
    inputs = make_inputs(shape)
    step = forward_backward(impl, on)
    step(*inputs)  # warm up outside the timing

    def run():
        step(*inputs)
        _sync()

    benchmark(run)


def main():
    import torch.utils.benchmark as tbench

    print(f"fd_jacobian_loss forward + backward, fp32, teacher given, {DEVICE}, {torch.get_num_threads()} threads")
    print(f"{'N x K':>10} {'on':>7} {'eager us':>10} {'fused us':>10} {'speed-up':>9}")
    for shape in SHAPES:
        inputs = make_inputs(shape)
        for on in ON:
            times = {}
            for impl in IMPLS:
                if _skip_reason(impl):
                    continue
                step = forward_backward(impl, on)
                step(*inputs)
                timer = tbench.Timer(stmt="step(*inputs); sync()",
                                     globals={"step": step, "inputs": inputs, "sync": _sync},
                                     num_threads=torch.get_num_threads())
                times[impl] = timer.blocked_autorange(min_run_time=1.0).median * 1e6
            fused = times.get("rkd_fast", float("nan"))
            print(f"{'x'.join(map(str, shape)):>10} {on:>7} {times['eager']:>10.1f} {fused:>10.1f} "
                  f"{times['eager'] / fused:>8.1f}x")


if __name__ == "__main__":
    main()
