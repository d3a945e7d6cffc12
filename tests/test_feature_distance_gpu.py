"""rkd_fast.feature_distance on a CUDA GPU: the "cuda" backend (csrc/cuda/feature_distance_cuda.cu) and the
"triton" backend, against the oracle: backend="reference" evaluated in float64 on the same input values, with
autograd for the gradients. Skips without a GPU; a backend that is unavailable on the GPU machine (extension
built without CUDA, triton missing) skips with the reason rkd_fast.backends() gives.

Besides modes × dtypes × layouts, the shapes cover both load paths of the CUDA kernel (16-byte vectors when
every sample starts aligned, scalar loads otherwise), several chunks per sample (the last block of each finishes
it) and large batches. Tests that call the ops directly ask for per-sample losses and the gradients of their sum.
These tests have not run on a GPU since the kernels became single-pass (no GPU was available)."""

import pytest
import torch
from _op_backends import GPU_MODULE_MARKS, gpu_backend_params

import rkd_fast
from rkd_fast.ops import _reference
from rkd_fast.ops.feature_distance import MODE_IDS, REDUCTION_IDS

pytestmark = GPU_MODULE_MARKS
STATUS, BACKENDS = gpu_backend_params("feature_distance")
OPS = {"cuda": "feature_distance_fwd", "triton": "feature_distance_fwd_triton"}
MODES = ("mse", "normalized", "attention")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Relative to the largest magnitude of the expected tensor. Both kernels accumulate in fp32 (fp64 for fp64);
# gradients are rounded to the input dtype (1 ulp: 2^-11 for fp16, 2^-8 for bf16).
TOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make(shape, dtype, layout="contiguous", device="cuda"):
    if layout == "channels_last":
        return torch.randn(shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "slice":  # every other channel (4-D) or column (2-D): copied to contiguous by the public API
        wide = torch.randn(shape[0], 2 * shape[1], *shape[2:], device=device).to(dtype)
        return wide[:, 1::2]
    if layout == "misaligned":  # contiguous, but the data starts 1 element past a 16-byte boundary
        flat = torch.randn(torch.Size(shape).numel() + 1, device=device).to(dtype)
        return flat[1:].view(shape)
    return torch.randn(shape, device=device).to(dtype)


def op(backend):
    return getattr(torch.ops.rkd_fast, OPS[backend])


def run_ops(backend, student, teacher, mode, p=2.0, needs=(True, True)):
    """(per-sample losses, gradient of their sum for the student, for the teacher) from the backend's op."""
    return op(backend)(student, teacher, MODE_IDS[mode], p, REDUCTION_IDS["none"], *needs)


def teacher_shape(shape, mode):
    return (shape[0], shape[1] + 3, *shape[2:]) if mode == "attention" else shape


def assert_close(actual, expected, dtype, what, loss=False):
    """actual (any float dtype) against the float64 oracle, within TOL[dtype] of its largest magnitude. Losses
    of modes 1 and 2 lie in [0, 4] and come from ‖x̂‖² + ‖ŷ‖² - 2x̂·ŷ: their error is absolute, so the scale
    is at least 1."""
    assert actual.shape == expected.shape, what
    expected = expected.detach().double()
    scale = expected.abs().nan_to_num(0.0, 0.0, 0.0).max().item() if expected.numel() else 0.0
    if loss:
        scale = max(scale, 1.0)
    tol = TOL[dtype]
    torch.testing.assert_close(actual.detach().double(), expected, rtol=tol, atol=tol * max(scale, 1e-30),
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def oracle(student, teacher, mode, p=2.0, reduction="none", weight=None):
    s = student.detach().double().requires_grad_()
    t = teacher.detach().double().requires_grad_()
    loss = _reference.feature_distance(s, t, mode=mode, p=p, reduction=reduction)
    (loss if weight is None else loss * weight.double()).sum().backward()
    return loss.detach(), s.grad, t.grad


def compare(backend, student, teacher, mode, p=2.0, reduction="none"):
    """The public function with `backend` against the oracle: the loss, and both gradients of a randomly
    weighted sum of the per-sample losses (so the per-sample scaling of the saved gradients is checked)."""
    dtype = student.dtype
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_()
    loss = rkd_fast.feature_distance(s, t, mode=mode, p=p, reduction=reduction, backend=backend)
    weight = torch.rand(loss.shape, device=loss.device, dtype=loss.dtype)
    (loss * weight).sum().backward()
    want_loss, want_s, want_t = oracle(student, teacher, mode, p, reduction, weight)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert s.grad.dtype == dtype and t.grad.dtype == dtype
    assert_close(loss, want_loss, dtype, f"{backend} {mode} loss", loss=True)
    assert_close(s.grad, want_s, dtype, f"{backend} {mode} student grad")
    assert_close(t.grad, want_t, dtype, f"{backend} {mode} teacher grad")
    return loss.detach(), s.grad, t.grad


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, mode, dtype, layout):
    shape = (6, 16, 14, 14)  # D and H·W multiples of 8: the vectorised path where the data is aligned
    compare(backend, make(shape, dtype, layout), make(teacher_shape(shape, mode), dtype, layout), mode)


# (mode, shape); "normalized" leaves out one-element samples, where x̂ = sign(x) and the gradient is
# rounding noise around 0 that nothing can be compared against
FLAT_CASES = [(mode, shape) for mode in ("mse", "normalized")
              for shape in [(1, 7, 11, 13), (5, 37), (4, 9, 1, 1), (2, 3, 1, 17), (3, 1, 1, 1), (9,)]
              if mode == "mse" or shape[1:] not in ((), (1, 1, 1))]


@pytest.mark.parametrize("mode, shape", FLAT_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes_flat(backend, mode, shape):
    compare(backend, make(shape, torch.float32), make(shape, torch.float32), mode)


@pytest.mark.parametrize("shapes", [((1, 7, 11, 13), (1, 3, 11, 13)), ((2, 1, 5, 1), (2, 3, 5, 1)),
                                    ((3, 300, 7, 7), (3, 5, 7, 7)), ((2, 3, 1, 97), (2, 2, 1, 97))], ids=str)
@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("channels_last", "contiguous"),
                                     ("channels_last", "channels_last")], ids="-".join)
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes_attention(backend, shapes, layouts):
    student = make(shapes[0], torch.float32, layouts[0])
    teacher = make(shapes[1], torch.float32, layouts[1])
    compare(backend, student, teacher, "attention")


@pytest.mark.parametrize("p", [1.0, 1.5, 3.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_p(backend, p, dtype):
    student = make((4, 12, 9, 9), dtype, "channels_last")
    teacher = make((4, 20, 9, 9), dtype)
    compare(backend, student, teacher, "attention", p=p)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_relu_features(backend, p):
    student = make((3, 16, 8, 8), torch.float32, "channels_last").relu()
    teacher = make((3, 8, 8, 8), torch.float32).relu()
    compare(backend, student, teacher, "attention", p=p)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions(backend, mode, reduction):
    shape = (5, 8, 6, 6)
    loss = compare(backend, make(shape, torch.float32), make(teacher_shape(shape, mode), torch.float32), mode,
                   reduction=reduction)[0]
    assert loss.shape == ((5,) if reduction == "none" else ())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_batch(backend, mode):
    """~800 KB of inputs per sample in fp16, 77 MB in all: more than an L2 cache holds."""
    shape = (96, 64, 56, 56)
    student = make(shape, torch.float16, "channels_last")
    teacher = make(teacher_shape(shape, mode), torch.float16, "channels_last")
    compare(backend, student, teacher, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_large_sample(backend, mode):
    """A batch of one: the whole GPU works on one sample through its chunks."""
    shape = (1, 8, 509, 503)
    compare(backend, make(shape, torch.float32), make(teacher_shape(shape, mode), torch.float32), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, mode):
    student = torch.randn(0, 3, 4, 4, device="cuda", requires_grad=True)
    teacher = torch.randn(0, 3, 4, 4, device="cuda", requires_grad=True)
    losses = rkd_fast.feature_distance(student, teacher, mode=mode, reduction="none", backend=backend)
    assert losses.shape == (0,)
    losses.sum().backward()
    assert student.grad.shape == student.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_samples(backend):
    """D = 0: the mean of no elements is NaN; the distance of two empty vectors is 0."""
    empty = torch.randn(3, 0, device="cuda")
    assert run_ops(backend, empty, empty, "mse")[0].isnan().all()
    assert (run_ops(backend, empty, empty, "normalized")[0] == 0).all()
    maps = torch.randn(2, 3, 0, 4, device="cuda")
    assert (run_ops(backend, maps, maps, "attention")[0] == 0).all()


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_single_position(backend, kind):
    """H·W = 1: both normalised maps are 1, so the loss and the gradients are 0 up to rounding."""
    student, teacher = make((4, 8, 1, 1), torch.float32, kind), make((4, 2, 1, 1), torch.float32, kind)
    losses, grad_s, grad_t = run_ops(backend, student, teacher, "attention")
    assert losses.abs().max() < 1e-6 and grad_s.abs().max() < 1e-5 and grad_t.abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["normalized", "attention"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_norm_sample(backend, mode):
    student = make((3, 2, 3, 3), torch.float64)
    student[1] = 0.0
    loss = compare(backend, student, make((3, 2, 3, 3), torch.float64), mode)[0]
    assert loss[1].item() == pytest.approx(1.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate(backend, mode):
    student, teacher = make((3, 4, 4, 4), torch.float32), make((3, 4, 4, 4), torch.float32)
    student[0, 1, 2, 2] = float("nan")
    teacher[2, 0, 0, 1] = float("inf")
    losses, grad_s, grad_t = run_ops(backend, student, teacher, mode)
    assert losses[0].isnan() and not losses[2].isfinite()
    want_loss, want_s, want_t = oracle(student, teacher, mode)
    assert_close(losses, want_loss, torch.float32, "losses", loss=True)
    assert grad_s[0].isnan().any() and grad_t[0].isnan().any()
    assert_close(grad_s[1], want_s[1], torch.float32, "student grad of the clean sample")
    assert_close(grad_t[1], want_t[1], torch.float32, "teacher grad of the clean sample")


@pytest.mark.parametrize("needs", [(True, False), (False, True), (False, False)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_flags_and_strides(backend, needs):
    student = make((2, 3, 4, 5), torch.bfloat16, "channels_last")
    teacher = make((2, 6, 4, 5), torch.bfloat16)
    losses, grad_s, grad_t = run_ops(backend, student, teacher, "attention", needs=needs)
    assert losses.dtype == torch.float32
    for need, grad, x in ((needs[0], grad_s, student), (needs[1], grad_t, teacher)):
        if need:
            assert grad.shape == x.shape and grad.dtype == x.dtype and grad.stride() == x.stride()
        else:
            assert grad.shape == (0,) and grad.dtype == x.dtype and grad.device == x.device


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, mode):
    """The per-sample sums are added in a fixed order (the atomic only counts arrivals), so two runs agree bit for
    bit."""
    shape = (8, 32, 28, 28)
    student, teacher = make(shape, torch.float32), make(teacher_shape(shape, mode), torch.float32)
    first = run_ops(backend, student, teacher, mode)
    second = run_ops(backend, student, teacher, mode)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_side_stream(backend):
    """Kernels run on the current stream: results are right when that is not the default stream."""
    shape = (16, 32, 14, 14)
    student, teacher = make(shape, torch.float32), make(shape, torch.float32)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        losses = rkd_fast.feature_distance(student, teacher, mode="normalized", reduction="none", backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    assert_close(losses, oracle(student, teacher, "normalized")[0], torch.float32, "losses", loss=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, mode):
    student = make((3, 4, 5, 6), torch.float32, "channels_last").requires_grad_()
    teacher = make(teacher_shape((3, 4, 5, 6), mode), torch.float32, "channels_last").requires_grad_()
    for reduction in ("mean", "none"):
        torch.library.opcheck(op(backend), (student, teacher, MODE_IDS[mode], 1.5, REDUCTION_IDS[reduction], True,
                                            True))


@pytest.mark.parametrize("scale", [1e18, 1e20, 1e37])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_values(backend, mode, scale):
    """Squares of values above ~1.8e19 overflow float32: the last block redoes such a sample on x/max|x|."""
    p = 4.0 if mode == "attention" else 2.0
    student = (make((4, 16, 8, 8), torch.float64) * scale).float()
    teacher = (make(teacher_shape((4, 16, 8, 8), mode), torch.float64) * scale).float()
    losses = run_ops(backend, student, teacher, mode, p)[0]
    expected = _reference.feature_distance(student.double(), teacher.double(), mode=mode, p=p, reduction="none")
    torch.testing.assert_close(losses, expected.float(), rtol=4 * torch.finfo(torch.float32).eps * 1024, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_gradient_at_exact_zeros(backend):
    """p < 1 on ReLU features: the subgradient 0 where F = 0, finite everywhere."""
    student = make((3, 16, 8, 8), torch.float32, "channels_last").relu()
    teacher = make((3, 8, 8, 8), torch.float32).relu()
    _, grad_s, grad_t = compare(backend, student, teacher, "attention", p=0.5)
    assert grad_s.isfinite().all() and (grad_s[student == 0] == 0).all()


@pytest.mark.parametrize("mode", ["normalized", "attention"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, mode):
    def loss_fn(s, t):
        return rkd_fast.feature_distance(s, t, mode=mode, reduction="mean", backend=backend) * 3.0

    compiled = torch.compile(loss_fn, fullgraph=True)
    shape = (4, 8, 6, 6)
    student = make(shape, torch.float32, "channels_last").requires_grad_()
    teacher = make(teacher_shape(shape, mode), torch.float32).requires_grad_()
    loss = compiled(student, teacher)
    loss.backward()
    s, t = student.detach().double().requires_grad_(), teacher.detach().double().requires_grad_()
    expected = _reference.feature_distance(s, t, mode=mode) * 3.0
    expected.backward()
    assert_close(loss, expected, torch.float32, "compiled loss", loss=True)
    assert_close(student.grad, s.grad, torch.float32, "compiled student grad")
    assert_close(teacher.grad, t.grad, torch.float32, "compiled teacher grad")
