"""What every rkd_fast.feature_distance test shares, on every backend and device: the inputs (`make`), the oracle
(backend "reference" evaluated in float64 on the same input values, autograd for the gradients), the comparison
with one tolerance table, the kernels called directly, and the bad arguments every kernel refuses."""

import math

import torch
from _op_backends import assert_close_scaled

import rkd_fast
from rkd_fast.ops.feature_distance import MODE_IDS, REDUCTION_IDS

MODES = ("mse", "normalized", "attention")
REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# "slice" and "transposed" are neither layout (the public function copies them to contiguous); "misaligned" is
# contiguous with its data 1 element past a 16-byte boundary (the CUDA kernel's scalar loads instead of vectors).
LAYOUTS = ("contiguous", "channels_last", "slice", "transposed", "misaligned")

# (rtol, atol as a fraction of the largest expected magnitude) of the losses and of the gradients, by the
# student's dtype, from the two things that round:
# - The sums. Every kernel sums in float32 (float64 for float64 inputs) from the input values, so a loss is nearly
#   as exact as float32 whatever the input dtype. The longest run of sequential adds is 512 (a 4096-element chunk
#   of the CPU kernel over 8 vector lanes, as under ATEN_CPU_CAPABILITY=default; the CUDA and Triton kernels add in
#   trees), whose error on unit-sized random terms grows as sqrt(512)·u ≈ 1.4e-6 (u = 2^-24); a distance or a
#   gradient coefficient combines up to four such sums of size ~1 (‖x̂‖² + ‖ŷ‖² - 2x̂·ŷ, whence the losses of
#   "normalized" and "attention" are compared at a scale of at least 1): ≈ 1e-5 at a few standard deviations,
#   hence 2e-5, and the same number of float64 ulps for float64.
# - The gradients' rounding to the input dtype, twice (the per-sample unit gradient, then its scale): up to 2
#   half-ulps, within 2·eps = 2^-9 ≈ 2e-3 for float16 and 2^-6 ≈ 1.6e-2 for bfloat16, relative to each element
#   (float32's are far below its sums' error).
_SUMS = {torch.float32: 2e-5,
         torch.float64: 2e-5 * torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps}
LOSS_TOL = {dtype: (_SUMS[torch.float64 if dtype == torch.float64 else torch.float32],) * 2 for dtype in DTYPES}
GRAD_TOL = {**LOSS_TOL, torch.float16: (2e-3, _SUMS[torch.float32]), torch.bfloat16: (1.6e-2, _SUMS[torch.float32])}

KERNEL_OPS = {"cpu": "feature_distance_fwd", "cuda": "feature_distance_fwd", "triton": "feature_distance_fwd_triton"}


def make(shape, dtype=torch.float32, layout="contiguous", device="cpu", requires_grad=True):
    """A leaf tensor of `shape` with the asked memory layout, its values drawn on the CPU (the same values on every
    device). The dtype cast and the move happen on the base tensor, since `.to()` of a non-dense view would come
    back contiguous."""
    def draw(*size):
        return torch.randn(size).to(dtype).to(device)

    if layout == "contiguous":
        x = draw(*shape)
    elif layout == "channels_last":
        x = draw(*shape).contiguous(memory_format=torch.channels_last)
    elif layout == "slice":  # every other channel (4-D) or column (2-D): not dense
        x = draw(shape[0], 2 * shape[1], *shape[2:])[:, 1::2]
    elif layout == "transposed":  # the last two dims swapped: dense, but neither of the two layouts
        x = draw(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    elif layout == "misaligned":
        x = draw(math.prod(shape) + 1)[1:].view(shape)
    else:
        raise AssertionError(layout)
    assert x.shape == shape
    if layout in ("slice", "transposed") and x.numel() > 0:
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    return x.detach().requires_grad_(requires_grad)


def teacher_shape(shape, mode):
    # Attention compares spatial maps only: give the teacher another channel count to cover that case.
    return (shape[0], shape[1] + 2, *shape[2:]) if mode == "attention" else shape


def assert_close(actual, expected, tol, *, mode="mse", loss=False, what="", floor=None):
    """`assert_close_scaled`, where the losses of "normalized" and "attention" are compared at a scale of at least
    1: they lie in [0, 4] and come from ‖x̂‖² + ‖ŷ‖² - 2x̂·ŷ, so their error is absolute, even where a loss is ~0."""
    assert_close_scaled(actual, expected, tol, what=what, floor=floor,
                        scale_at_least=1.0 if loss and mode != "mse" else 0.0)


def oracle(student, teacher, *, mode, p=2.0, reduction="none", weight=None):
    """(loss, gradient for the student, for the teacher) of backend "reference" in float64 on the same values (the
    teacher cast to the student's dtype first, as documented); the gradients are those of Σ weight·loss (weight
    default 1), for the inputs that require one (None for the others)."""
    s64 = student.detach().double().requires_grad_(student.requires_grad)
    t64 = teacher.detach().to(student.dtype).double().requires_grad_(teacher.requires_grad)
    loss = rkd_fast.feature_distance(s64, t64, mode=mode, p=p, reduction=reduction, backend="reference")
    inputs = [x for x in (s64, t64) if x.requires_grad]
    grads = iter(torch.autograd.grad(loss, inputs, torch.ones_like(loss) if weight is None else weight.double())
                 if inputs else ())
    return (loss.detach(), *(next(grads) if x.requires_grad else None for x in (s64, t64)))


def check_op(student, teacher, *, mode, backend, reduction="mean", p=2):
    """Runs the op, then checks the loss and the gradient of every input that requires one against the oracle; a
    different weight per sample checks that the backward scales each sample by its own upstream gradient.
    Returns (loss, [gradients of the inputs that require one])."""
    loss = rkd_fast.feature_distance(student, teacher, mode=mode, p=p, reduction=reduction, backend=backend)
    weight = (torch.rand(loss.shape, dtype=torch.float64) + 0.5).to(loss.device)
    expected, *expected_grads = oracle(student, teacher, mode=mode, p=p, reduction=reduction, weight=weight)

    assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    assert loss.shape == expected.shape == ((student.shape[0],) if reduction == "none" else ())
    assert_close(loss, expected, LOSS_TOL[student.dtype], mode=mode, loss=True, what=f"{backend} {mode} loss")

    inputs = [x for x in (student, teacher) if x.requires_grad]
    assert loss.requires_grad == bool(inputs)
    if not inputs:
        return loss, []
    grads = torch.autograd.grad(loss, inputs, weight.to(loss.dtype))
    for name, x, g, g64 in zip(("student", "teacher"), inputs, grads, [g for g in expected_grads if g is not None]):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_close(g, g64, GRAD_TOL[student.dtype], what=f"{backend} {mode} {name} grad")
    return loss, list(grads)


def kernel(backend):
    """The op of `backend`'s kernel (its schema: student, teacher, mode id, p, reduction id, grad flags)."""
    return getattr(torch.ops.rkd_fast, KERNEL_OPS[backend])


def run_kernel(backend, student, teacher, mode, p=2.0, reduction="none", needs=(True, True)):
    """The kernel called directly: (losses, gradient of their reduction for the student, for the teacher); a
    gradient not asked for comes back empty."""
    return kernel(backend)(student, teacher, MODE_IDS[mode], p, REDUCTION_IDS[reduction], *needs)


def triton_module():
    # imported when a test runs: under tests/triton, after its conftest switched the interpreter on
    from rkd_fast.ops.triton import feature_distance
    return feature_distance


def checked_kernel(backend):
    """What checks a kernel's arguments past the Python API: the C++ op (csrc/input_checks.cpp, one definition for
    the CPU and CUDA kernels), or the Triton kernel's Python entry."""
    return triton_module().forward if backend == "triton" else kernel(backend)


def bad_kernel_arguments(a):
    """(arguments of a kernel (student, teacher, mode, p, reduction, grad_student, grad_teacher), exception type,
    message pattern) that every kernel refuses with the Python API's exception types and words, built from `a`, a
    (2, 3, 4, 5) float32 tensor on the kernel's device."""
    cases = [
        ((a, a.contiguous(memory_format=torch.channels_last), 0, 2.0), ValueError,
         "both contiguous or both channels_last"),
        ((a, a, 3, 2.0), ValueError, "mode must be"),
        ((a, a.double(), 1, 2.0), TypeError, "dtypes differ"),
        ((a.int(), a.int(), 1, 2.0), TypeError, r"unsupported dtype (Int|torch\.int32)"),  # c10's and torch's names
        ((a, a[:, :, :, :4], 0, 2.0), ValueError, "equal shapes"),
        ((a, a[:, :2], 0, 2.0), ValueError, "equal shapes"),
        ((a, a[:1], 0, 2.0), ValueError, "same batch size"),
        ((a[..., ::2], a[..., ::2].contiguous(), 2, 2.0), ValueError, "contiguous or channels_last"),
        ((a[0, 0], a[0, 0], 2, 2.0), ValueError, "4-D"),
        ((a, a, 2, 0.0), ValueError, "p must be"),
        ((a, a, 2, math.nan), ValueError, "p must be"),
        ((a, a, 1, 2.0, 3), ValueError, "reduction must be"),
        ((a, a, 1, 2.0, -1), ValueError, "reduction must be"),
    ]
    if a.is_cuda:  # the dispatcher picks the CUDA kernel for a CPU tensor beside a CUDA one
        cases.append(((a, a.cpu(), 0, 2.0), ValueError, "student and teacher are on"))
    # reduction "mean" and both gradients unless the case says otherwise
    return [(args + (0, True, True)[len(args) - 4:], error, message) for args, error, message in cases]
