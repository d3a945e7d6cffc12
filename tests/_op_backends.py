"""What the tests of the fused ops (feature_distance, fd_jacobian_loss) share: where they run, as (backend, device)
targets that skip with the reason where a backend cannot run here; the one rule by which a result is compared
with its oracle; and the profiler probe of the ops a call runs.

Each op has one test module (tests/test_<op>.py) whose tests take a target fixture made here; tests/triton holds a
thin module per op that runs the same tests over the Triton kernel under the interpreter, in a process of its own
(TRITON_INTERPRET=1 must be set before triton is imported)."""

import inspect
import math
import os

import pytest
import torch

from rkd_fast.ops import backend_status

# pytestmark of a module of GPU tests: marked `gpu`, skipped with the reason on a machine without one.
NO_GPU = "needs a CUDA GPU (torch.cuda.is_available() is False)"
GPU_MODULE_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)]

# The device each backend serves in the main test process; Triton on CPU tensors (the interpreter) runs in
# tests/triton only.
DEVICES = {"reference": "cpu", "cpu": "cpu", "cuda": "cuda", "triton": "cuda"}
# The target fixtures of an op's test module: which backends each one runs a test over.
TARGET_FIXTURES = {
    "target": ("reference", "cpu", "cuda", "triton"),  # the public function: every backend
    "kernel_target": ("cpu", "cuda", "triton"),        # the op's kernels, called directly
    "cxx_kernel_target": ("cpu", "cuda"),              # the C++ kernels (csrc/), their shared argument checks
    "triton_target": ("triton",),                      # what only the Triton kernel has (its launch config)
    "gpu_target": ("cuda", "triton"),                  # what only a GPU has (streams, its memory, its load paths)
}
# The target of tests/triton: the Triton kernel on CPU tensors, under the interpreter, which runs the tests that
# take these fixtures.
INTERPRETED = ("triton", "cpu")
INTERPRETED_FIXTURES = ("target", "kernel_target", "triton_target")


def _target_param(op, backend, device):
    reason = NO_GPU if device == "cuda" and not torch.cuda.is_available() else backend_status(op, backend, device)
    marks = [pytest.mark.skipif(reason is not None, reason=f"backend {backend!r} on {device}: {reason}")]
    if device == "cuda":
        marks.append(pytest.mark.gpu)
    return pytest.param((backend, device), id=f"{backend}-{device}", marks=marks)


def needs_cpu_kernel(op):
    """The mark of a test of `op`'s C++ CPU kernel itself (the ops it runs, its registration): skipped with the
    reason while that kernel is not built."""
    reason = backend_status(op, "cpu", "cpu")
    return pytest.mark.skipif(reason is not None, reason=f"backend 'cpu': {reason}")


def _fixture(name, params):
    @pytest.fixture(name=name, params=params)
    def target(request):
        return request.param

    return target


def target_fixtures(op, *names):
    """The fixtures `names` of TARGET_FIXTURES for `op`, each giving a test its (backend, device) targets in turn."""
    return [_fixture(name, [_target_param(op, backend, DEVICES[backend]) for backend in TARGET_FIXTURES[name]])
            for name in names]


def interpreter_fixtures(op, module):
    """For a module of tests/triton: the fixtures INTERPRETED_FIXTURES, each giving the one target INTERPRETED, and
    the tests of `module` (an op's test module) that take one of them. Without TRITON_INTERPRET=1 (a GPU machine)
    the target skips: those tests run over ("triton", "cuda") in `module`."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        param = _target_param(op, *INTERPRETED)
    else:
        param = pytest.param(INTERPRETED, id="triton-cpu", marks=pytest.mark.skip(
            reason=f"Triton runs on the GPU here: {module.__name__}.py runs these tests over triton-cuda"))
    tests = {name: test for name, test in vars(module).items()
             if name.startswith("test_") and set(inspect.signature(test).parameters) & set(INTERPRETED_FIXTURES)}
    return [_fixture(name, [param]) for name in INTERPRETED_FIXTURES], tests


# The interpreter runs each block of a kernel as Python: on its target the tests keep to inputs of at most this
# many elements in all, per op (feature_distance ~1 s per 10,000 elements; fd_jacobian, a program per row,
# ~1 s per 1,000); larger ones run over triton-cuda on a GPU.
INTERPRETER_ELEMENTS = {"feature_distance": 8192, "fd_jacobian": 4096}


def skip_large_under_interpreter(op, target, *shapes):
    """Skips the test on the interpreter's target when the inputs of `shapes` hold more elements than
    INTERPRETER_ELEMENTS[op]."""
    elements = sum(math.prod(shape) for shape in shapes)
    if target == INTERPRETED and elements > INTERPRETER_ELEMENTS[op]:
        pytest.skip(f"{elements} input elements: too slow under the Triton interpreter (tests/triton keeps to "
                    f"{INTERPRETER_ELEMENTS[op]}); runs over triton-cuda on a GPU")


def assert_close_scaled(actual, expected, tol, *, what="", scale_at_least=0.0, floor=None):
    """`actual` within `tol` = (rtol, atol) of `expected` (its oracle, float64), atol relative to the largest
    magnitude of `expected` (taken as at least `scale_at_least`). `floor` (default: a few ulps of unit-sized values
    in float32, float64 for float64 results) covers values that are 0 in exact arithmetic, which rounding leaves
    at a few ulps. NaN must meet NaN."""
    rtol, atol = tol
    finite = expected.detach().double().abs().nan_to_num(0.0, 0.0, 0.0)
    scale = max(finite.max().item() if expected.numel() else 0.0, scale_at_least)
    if floor is None:
        floor = 1e-12 if actual.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=rtol,
                               atol=atol * scale + floor, equal_nan=True, msg=lambda m: f"{what}: {m}")


# Ops that copy a tensor (aten::to may return self).
COPY_OPS = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"}


def ops_run(fn):
    """Names of the ops `fn()` runs on CPU. Callers use reduction="none": a mean's division by N converts the
    scalar with a (tiny) aten::_to_copy."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}
