"""rkd_fast.feature_distance on every backend, each on its device (the targets of tests/_op_backends.py:
reference and cpu on CPU tensors, cuda and triton on a GPU), against the oracle: backend="reference" evaluated in
float64 on the same input values (tests/_feature_distance_checks.py). A target that cannot run here skips with the
reason: the cpu one while the C++ kernel is not built, the GPU ones without a GPU (those are marked `gpu`). The
Triton kernel on CPU tensors runs these same tests under the interpreter, in tests/triton.

Besides modes × dtypes × layouts, the shapes cover both load paths of the CUDA kernel (16-byte vectors when every
sample starts aligned, scalar loads otherwise), several chunks per sample (the last block of each finishes it),
tails in every vector loop, and on a GPU batches larger than its L2 cache. The GPU targets have not run since the
kernels became single-pass (no GPU was available)."""

import math
import os
import tempfile

import pytest
import torch
from _feature_distance_checks import (DTYPES, GRAD_TOL, LAYOUTS, LOSS_TOL, MODES, REDUCTIONS, assert_close,
                                      bad_kernel_arguments, check_op, checked_kernel, kernel, make, oracle,
                                      run_kernel, teacher_shape, triton_module)
from _op_backends import (COPY_OPS, INTERPRETED, needs_cpu_kernel, ops_run, skip_large_under_interpreter,
                          target_fixtures)

import rkd_fast
from rkd_fast.ops import backend_status
from rkd_fast.ops.feature_distance import MODE_IDS, REDUCTION_IDS

pytestmark = pytest.mark.cross_path  # `make test` runs it again on ATen's portable kernels

target, kernel_target, triton_target, gpu_target = target_fixtures(
    "feature_distance", "target", "kernel_target", "triton_target", "gpu_target")
needs_cpu = needs_cpu_kernel("feature_distance")

# (3, 4, 5, 6): sizes that leave a tail in every vector loop; (6, 16, 14, 14): D and H·W multiples of 8, the CUDA
# kernel's vector loads where the data is aligned.
SHAPES = [(3, 4, 5, 6), (6, 16, 14, 14)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(target, mode, reduction, dtype, layout, shape):
    skip_large_under_interpreter("feature_distance", target, shape, teacher_shape(shape, mode))
    backend, device = target
    student = make(shape, dtype, layout, device)
    teacher = make(teacher_shape(shape, mode), dtype, layout, device)
    _, grads = check_op(student, teacher, mode=mode, backend=backend, reduction=reduction)
    # A kernel writes each gradient in its input's layout (torch.autograd.grad returns it as produced; `.grad`
    # would be re-laid-out by AccumulateGrad anyway). The reference's reshapes give contiguous gradients.
    if layout == "channels_last" and backend != "reference":
        for g in grads:
            assert g.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layouts", [("channels_last", "contiguous"), ("contiguous", "channels_last"),
                                     ("slice", "channels_last"), ("channels_last", "transposed")])
@pytest.mark.parametrize("mode", MODES)
def test_mixed_layouts(target, mode, layouts):
    backend, device = target
    shape = (2, 3, 4, 5)
    check_op(make(shape, layout=layouts[0], device=device),
             make(teacher_shape(shape, mode), layout=layouts[1], device=device), mode=mode, backend=backend,
             reduction="none")


@pytest.mark.parametrize("needs", ["student", "teacher", "neither"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_only_one_input_requires_grad(target, mode, dtype, needs):
    backend, device = target
    shape = (3, 4, 5, 5)
    student = make(shape, dtype, device=device, requires_grad=needs == "student")
    teacher = make(teacher_shape(shape, mode), dtype, device=device, requires_grad=needs == "teacher")
    check_op(student, teacher, mode=mode, backend=backend, reduction="sum")


@pytest.mark.parametrize("mode", MODES)
def test_no_grad_mode(target, mode):
    backend, device = target
    student, teacher = make((2, 3, 4, 4), device=device), make(teacher_shape((2, 3, 4, 4), mode), device=device)
    with torch.no_grad():
        loss = rkd_fast.feature_distance(student, teacher, mode=mode, backend=backend)
    assert not loss.requires_grad
    assert_close(loss, oracle(student, teacher, mode=mode, reduction="mean")[0], LOSS_TOL[torch.float32], mode=mode,
                 loss=True)


FLAT = ("mse", "normalized")  # attention's odd shapes: test_odd_shapes_attention
ODD_CASES = [(shape, mode) for shape, modes in [
    ((1, 3, 4, 4), MODES), ((1, 7, 11, 13), FLAT),                  # N = 1
    ((7, 13, 5, 3), MODES),                                         # prime sizes
    ((4, 5, 1, 1), MODES), ((4, 9, 1, 1), FLAT),                    # H·W = 1
    ((2, 3, 1, 1), FLAT), ((3, 2, 1, 5), FLAT), ((2, 3, 1, 17), FLAT),
    ((2, 2048, 2, 3), MODES),                                       # C = 2048
    ((2, 40, 29, 23), MODES),  # many chunks per sample in a parallel kernel (and a tail in each vector loop)
    ((5, 37), FLAT),                                                # 2-D (N, K)
    ((6,), FLAT),                                                   # 1-D (N,)
    # one element per sample; "normalized" (x̂ = sign(x)): test_normalized_single_element_samples
    ((3, 1, 1, 1), ("mse",)),
] for mode in modes]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape, mode", ODD_CASES, ids=[f"{m}-{'x'.join(map(str, s))}" for s, m in ODD_CASES])
def test_odd_shapes(target, shape, mode, dtype):
    skip_large_under_interpreter("feature_distance", target, shape, teacher_shape(shape, mode))
    backend, device = target
    check_op(make(shape, dtype, device=device), make(teacher_shape(shape, mode), dtype, device=device), mode=mode,
             backend=backend, reduction="none")


@pytest.mark.parametrize("shapes", [((1, 7, 11, 13), (1, 3, 11, 13)), ((2, 1, 5, 1), (2, 3, 5, 1)),
                                    ((3, 300, 7, 7), (3, 5, 7, 7)), ((2, 3, 1, 97), (2, 2, 1, 97)),
                                    ((2, 3, 1, 13), (2, 2, 1, 13))], ids=str)
@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("channels_last", "contiguous"),
                                     ("contiguous", "channels_last"), ("channels_last", "channels_last")],
                         ids="-".join)
def test_odd_shapes_attention(target, shapes, layouts):
    skip_large_under_interpreter("feature_distance", target, *shapes)
    backend, device = target
    check_op(make(shapes[0], layout=layouts[0], device=device), make(shapes[1], layout=layouts[1], device=device),
             mode="attention", backend=backend, reduction="none")


@pytest.mark.parametrize("mode", ("mse", "normalized"))
def test_transposed_2d(target, mode):
    backend, device = target
    check_op(make((4, 9), layout="transposed", device=device), make((4, 9), layout="transposed", device=device),
             mode=mode, backend=backend)


@pytest.mark.parametrize("shapes", [((3, 4, 5, 5), (3, 7, 5, 5)), ((4, 12, 9, 9), (4, 20, 9, 9))], ids=str)
@pytest.mark.parametrize("student_layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("p", (0.5, 1, 1.5, 2, 2.5, 3))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_channels_and_p(target, dtype, p, student_layout, shapes):
    skip_large_under_interpreter("feature_distance", target, *shapes)
    backend, device = target
    check_op(make(shapes[0], dtype, student_layout, device), make(shapes[1], dtype, device=device),
             mode="attention", p=p, backend=backend, reduction="none")


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                    (torch.float32, torch.float64), (torch.float64, torch.float32)], ids=str)
@pytest.mark.parametrize("teacher_grad", (True, False))
@pytest.mark.parametrize("mode", MODES)
def test_mixed_dtypes(target, mode, teacher_grad, dtypes):
    backend, device = target
    s_dtype, t_dtype = dtypes
    shape = (3, 4, 5, 5)
    student = make(shape, s_dtype, device=device)
    teacher = make(teacher_shape(shape, mode), t_dtype, device=device, requires_grad=teacher_grad)
    # check_op asserts: loss in float32 (float64 when the student is float64), each gradient in its input's
    # dtype (so the teacher's arrives in t_dtype), values against the reference on the teacher cast to s_dtype.
    check_op(student, teacher, mode=mode, backend=backend, reduction="none")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(target, mode, reduction):
    backend, device = target
    student, teacher = make((0, 3, 4, 4), device=device), make(teacher_shape((0, 3, 4, 4), mode), device=device)
    loss = rkd_fast.feature_distance(student, teacher, mode=mode, reduction=reduction, backend=backend)
    expected = rkd_fast.feature_distance(student.detach(), teacher.detach(), mode=mode, reduction=reduction,
                                         backend="reference")
    torch.testing.assert_close(loss, expected, equal_nan=True)  # mean: nan, sum: 0, none: shape (0,), float32
    grads = torch.autograd.grad(loss.sum(), (student, teacher))
    assert grads[0].shape == student.shape and grads[1].shape == teacher.shape


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0/0
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
def test_empty_samples(target):
    """D = 0: the mean of no elements is NaN (as in the reference); the distance of two empty vectors is 0."""
    backend, device = target
    cases = [("mse", (3, 0), (3, 0)), ("normalized", (3, 0), (3, 0)), ("attention", (2, 3, 0, 4), (2, 2, 0, 4))]
    for mode, s_shape, t_shape in cases:
        losses = check_op(make(s_shape, device=device), make(t_shape, device=device), mode=mode, backend=backend,
                          reduction="none")[0]
        assert losses.isnan().all() if mode == "mse" else (losses == 0).all(), mode


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("value", (math.nan, math.inf, -math.inf))
@pytest.mark.parametrize("where", ("student", "teacher"))
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_inputs_propagate(target, mode, where, value):
    backend, device = target
    shape = (3, 4, 5, 5)
    inputs = {"student": make(shape, device=device, requires_grad=False),
              "teacher": make(teacher_shape(shape, mode), device=device, requires_grad=False)}
    inputs[where][1, 2, 3, 4] = value  # one element of sample 1
    losses = rkd_fast.feature_distance(inputs["student"], inputs["teacher"], mode=mode, reduction="none",
                                       backend=backend)
    expected = oracle(inputs["student"], inputs["teacher"], mode=mode)[0]
    assert not torch.isfinite(expected[1]), "the oracle itself should give a non-finite loss"
    assert not torch.isfinite(losses[1]), f"sample 1 holds {value} but its loss is {losses[1].item()}"
    assert_close(losses[[0, 2]], expected[[0, 2]], LOSS_TOL[torch.float32], mode=mode, loss=True)
    for reduction in ("mean", "sum"):
        loss = rkd_fast.feature_distance(inputs["student"], inputs["teacher"], mode=mode, reduction=reduction,
                                         backend=backend)
        assert not torch.isfinite(loss), f"reduction={reduction!r} gave {loss.item()}"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("mode", MODES)
def test_nan_and_inf_propagate_through_the_kernel(kernel_target, mode):
    # The kernel's own outputs: a NaN in sample 0 makes its loss and both its gradients NaN, an inf in sample 2
    # its loss non-finite (mse of an inf is inf, the normalised ones NaN); the clean sample 1 is untouched.
    backend, device = kernel_target
    student, teacher = (make((3, 4, 4, 4), device=device, requires_grad=False) for _ in range(2))
    student[0, 1, 2, 2] = float("nan")
    teacher[2, 0, 0, 1] = float("inf")
    losses, grad_s, grad_t = run_kernel(backend, student, teacher, mode)
    assert losses[0].isnan() and not losses[2].isfinite()
    want_loss, want_s, want_t = oracle(student.requires_grad_(), teacher.requires_grad_(), mode=mode)
    assert_close(losses, want_loss, LOSS_TOL[torch.float32], mode=mode, loss=True, what="losses")
    assert grad_s[0].isnan().any() and grad_t[0].isnan().any()
    assert grad_s[1].isfinite().all() and grad_t[1].isfinite().all()
    assert_close(grad_s[1], want_s[1], GRAD_TOL[torch.float32], what="student grad of the clean sample")
    assert_close(grad_t[1], want_t[1], GRAD_TOL[torch.float32], what="teacher grad of the clean sample")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("which", ("student", "teacher", "both"))
@pytest.mark.parametrize("mode", MODES)
def test_all_zero_sample(target, mode, which, dtype):
    # A zero sample has norm 0: the normalisations divide by the 1e-12 floor instead (loss 1 against a nonzero
    # sample, 0 against zero), with finite gradients, as torch.nn.functional.normalize does.
    backend, device = target
    shape = (3, 4, 5, 5)
    student = make(shape, dtype, device=device, requires_grad=False)
    teacher = make(teacher_shape(shape, mode), dtype, device=device, requires_grad=False)
    if which in ("student", "both"):
        student[1] = 0
    if which in ("teacher", "both"):
        teacher[1] = 0
    loss, grads = check_op(student.requires_grad_(), teacher.requires_grad_(), mode=mode, backend=backend,
                           reduction="none")
    assert all(torch.isfinite(g).all() for g in grads)
    if mode != "mse":
        assert loss[1].item() == pytest.approx(0.0 if which == "both" else 1.0, abs=LOSS_TOL[dtype][1])


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_attention_single_position(kernel_target, kind):
    """H·W = 1: both normalised maps are 1, so the loss and the gradients are 0 up to rounding (the reference's
    exact zeros leave nothing to compare relative to)."""
    backend, device = kernel_target
    student = make((4, 8, 1, 1), layout=kind, device=device, requires_grad=False)
    teacher = make((4, 2, 1, 1), layout=kind, device=device, requires_grad=False)
    losses, grad_s, grad_t = run_kernel(backend, student, teacher, "attention")
    assert losses.abs().max() < 1e-6
    assert grad_s.abs().max() < 1e-5 and grad_t.abs().max() < 1e-5


def test_normalized_single_element_samples(kernel_target):
    """With one element per sample x̂ = sign(x): the loss is 0 or 4 and the gradient is 0 up to rounding
    (where a comparison relative to the reference's own rounding noise means nothing)."""
    backend, device = kernel_target
    student, teacher = (make((6,), device=device, requires_grad=False) for _ in range(2))
    losses, grad_s, grad_t = run_kernel(backend, student, teacher, "normalized")
    assert_close(losses, (student.sign() - teacher.sign()).pow(2), LOSS_TOL[torch.float32], mode="normalized",
                 loss=True)
    assert grad_s.abs().max() < 1e-5 and grad_t.abs().max() < 1e-5


def test_attention_without_channels(kernel_target):
    """C = 0: the student's map is 0, so loss = ‖0 - â_t‖² = 1 and the teacher's gradient (that of ‖â_t‖²)
    is 0 up to rounding."""
    backend, device = kernel_target
    student = make((2, 0, 3, 3), device=device, requires_grad=False)
    teacher = make((2, 2, 3, 3), device=device, requires_grad=False)
    losses, grad_s, grad_t = run_kernel(backend, student, teacher, "attention")
    assert_close(losses, torch.ones(2, device=device), LOSS_TOL[torch.float32], mode="attention", loss=True)
    assert grad_s.shape == student.shape and grad_t.abs().max() < 1e-5


# (needs, dtype, mode, the student's layout)
FLAG_CASES = [(needs, dtype, mode, layout)
              for needs in [(True, True), (True, False), (False, True), (False, False)]
              for dtype, mode, layout in [(torch.bfloat16, "attention", "channels_last"),
                                          (torch.float32, "attention", "channels_last"),
                                          (torch.float16, "normalized", "contiguous")]]


@pytest.mark.parametrize("needs, dtype, mode, layout", FLAG_CASES, ids=str)
def test_gradient_flags_and_strides(kernel_target, needs, dtype, mode, layout):
    # A gradient asked for comes in its input's dtype and strides (channels_last stays channels_last); one not
    # asked for comes back empty, on the input's device.
    backend, device = kernel_target
    student = make((2, 3, 4, 5), dtype, layout, device, requires_grad=False)
    teacher = make(teacher_shape((2, 3, 4, 5), mode), dtype, device=device, requires_grad=False)
    losses, grad_s, grad_t = run_kernel(backend, student, teacher, mode, needs=needs)
    assert losses.dtype == torch.float32
    for need, grad, x in ((needs[0], grad_s, student), (needs[1], grad_t, teacher)):
        if need:
            assert grad.shape == x.shape and grad.dtype == x.dtype and grad.stride() == x.stride()
        else:
            assert grad.shape == (0,) and grad.dtype == x.dtype and grad.device == x.device
    assert_close(losses, oracle(student, teacher, mode=mode)[0], LOSS_TOL[dtype], mode=mode, loss=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_kernel_reduces_and_weights_the_gradient(kernel_target, mode, reduction):
    """The kernel's loss is reduced as asked, and its gradients are those of that loss: the per-sample gradients
    of reduction "none" (the gradient of their sum) divided by N for the mean."""
    backend, device = kernel_target
    student = make((3, 4, 5, 5), torch.float64, device=device, requires_grad=False)
    teacher = make(teacher_shape((3, 4, 5, 5), mode), torch.float64, device=device, requires_grad=False)
    losses, unit_s, unit_t = run_kernel(backend, student, teacher, mode)
    loss, grad_s, grad_t = run_kernel(backend, student, teacher, mode, reduction=reduction)
    expected = {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]
    eps = 8 * torch.finfo(torch.float64).eps  # the same float64 sums, 1/N applied before or after the products
    torch.testing.assert_close(loss, expected, rtol=eps, atol=0)
    factor = 1 / 3 if reduction == "mean" else 1.0
    for grad, unit in ((grad_s, unit_s), (grad_t, unit_t)):
        torch.testing.assert_close(grad, unit * factor, rtol=eps, atol=eps * unit.abs().max().item())


@pytest.mark.parametrize("mode", MODES)
def test_backward_scales_by_the_upstream_gradient(target, mode):
    """Sample i's gradients are weight[i] times those of weight 1; a NaN weight gives NaN gradients for its sample
    only."""
    backend, device = target
    student = make((3, 3, 4, 5), device=device)
    teacher = make(teacher_shape((3, 3, 4, 5), mode), device=device)
    losses = rkd_fast.feature_distance(student, teacher, mode=mode, reduction="none", backend=backend)
    unit = torch.autograd.grad(losses.sum(), (student, teacher), retain_graph=True)
    weight = torch.tensor([0.5, -3.0, float("nan")], device=device)
    grads = torch.autograd.grad(losses, (student, teacher), weight)
    for grad, one in zip(grads, unit):
        assert_close(grad[:2], one[:2] * weight[:2, None, None, None], GRAD_TOL[torch.float32],
                     what=f"{mode} scaled grad")
        assert grad[2].isnan().all()


@pytest.mark.parametrize("mode", MODES)
def test_deterministic(gpu_target, mode):
    """The per-sample sums are added in a fixed order (the atomic only counts arrivals), so two runs agree bit for
    bit."""
    backend, device = gpu_target
    shape = (8, 32, 28, 28)
    student = make(shape, device=device, requires_grad=False)
    teacher = make(teacher_shape(shape, mode), device=device, requires_grad=False)
    first = run_kernel(backend, student, teacher, mode)
    second = run_kernel(backend, student, teacher, mode)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_many_chunks(triton_target, monkeypatch):
    """The path a large input takes in the Triton kernel: many chunks per sample, in the forward and the
    backward."""
    backend, device = triton_target
    module = triton_module()
    config = module._config

    def many_programs(dev):
        return {**config(dev), "programs": 64}

    monkeypatch.setattr(module, "_config", many_programs)
    for mode in MODES:
        student = make((3, 4, 9, 10), layout="channels_last", device=device)
        teacher = make(teacher_shape((3, 4, 9, 10), mode), layout="channels_last", device=device)
        check_op(student, teacher, mode=mode, backend=backend, reduction="none")


@pytest.mark.parametrize("mode", MODES)
def test_large_batch(gpu_target, mode):
    """~800 KB of inputs per sample in fp16, 77 MB in all: more than an L2 cache holds."""
    backend, device = gpu_target
    shape = (96, 64, 56, 56)
    check_op(make(shape, torch.float16, "channels_last", device),
             make(teacher_shape(shape, mode), torch.float16, "channels_last", device), mode=mode, backend=backend,
             reduction="none")


@pytest.mark.parametrize("mode", MODES)
def test_one_large_sample(gpu_target, mode):
    """A batch of one: the whole GPU works on one sample through its chunks."""
    backend, device = gpu_target
    shape = (1, 8, 509, 503)
    check_op(make(shape, device=device), make(teacher_shape(shape, mode), device=device), mode=mode,
             backend=backend, reduction="none")


def test_side_stream(gpu_target):
    """Kernels run on the current stream: results are right when that is not the default stream."""
    backend, device = gpu_target
    shape = (16, 32, 14, 14)
    student, teacher = make(shape, device=device), make(shape, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        losses = rkd_fast.feature_distance(student, teacher, mode="normalized", reduction="none", backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    assert_close(losses, oracle(student, teacher, mode="normalized")[0], LOSS_TOL[torch.float32], mode="normalized",
                 loss=True)


# --- gradcheck, opcheck, torch.compile ---------------------------------------------------------------------

GRADCHECK_CASES = [("mse", 2), ("normalized", 2), ("attention", 0.5), ("attention", 1), ("attention", 2),
                   ("attention", 3)]


@pytest.mark.parametrize("mode, p", GRADCHECK_CASES, ids=[f"{m}-p{p}" for m, p in GRADCHECK_CASES])
def test_gradcheck(target, mode, p):
    backend, device = target
    student = make((2, 3, 3, 2), torch.float64, device=device)
    teacher = make(teacher_shape((2, 3, 3, 2), mode), torch.float64, device=device)
    for reduction in ("none", "mean"):
        # Under the interpreter each of the ~200 evaluations of a full gradcheck costs ~0.1 s: there the fast
        # mode, one random direction per input instead of every element.
        assert torch.autograd.gradcheck(
            lambda s, t: rkd_fast.feature_distance(s, t, mode=mode, p=p, reduction=reduction, backend=backend),
            (student, teacher), fast_mode=target == INTERPRETED)


# (student, teacher as make's (shape, dtype, layout, requires_grad), mode, p, reduction)
OPCHECK_SAMPLES = [
    (((3, 4, 5, 6), torch.float32, "contiguous", True), ((3, 4, 5, 6), torch.float32, "contiguous", True),
     "mse", 2.0, "mean"),
    (((2, 3, 4, 4), torch.float32, "channels_last", True), ((2, 3, 4, 4), torch.float32, "channels_last", False),
     "normalized", 2.0, "sum"),
    (((2, 3, 4, 4), torch.float32, "contiguous", False), ((2, 5, 4, 4), torch.float32, "contiguous", True),
     "attention", 3.0, "none"),
    (((2, 3, 4, 4), torch.bfloat16, "contiguous", True), ((2, 6, 4, 4), torch.bfloat16, "channels_last", True),
     "attention", 1.0, "mean"),
    (((4, 10), torch.float64, "contiguous", True), ((4, 10), torch.float64, "contiguous", True), "normalized", 2.0,
     "none"),
    (((3, 2, 3, 3), torch.bfloat16, "contiguous", True), ((3, 2, 3, 3), torch.bfloat16, "contiguous", True),
     "normalized", 2.0, "sum"),
    # channels_last, p = 1.5, both reductions the kernel takes a gradient weight in, with both gradients and with
    # the student's only
    *[(((3, 4, 5, 6), torch.float32, "channels_last", True),
       (teacher_shape((3, 4, 5, 6), mode), torch.float32, "channels_last", teacher_grad), mode, 1.5, reduction)
      for mode in MODES for reduction in ("mean", "none") for teacher_grad in (True, False)],
]


@pytest.mark.parametrize("index", range(len(OPCHECK_SAMPLES)))
def test_opcheck(kernel_target, index):
    backend, device = kernel_target
    (s_shape, s_dtype, s_layout, s_grad), (t_shape, t_dtype, t_layout, t_grad), mode, p, reduction = \
        OPCHECK_SAMPLES[index]
    student = make(s_shape, s_dtype, s_layout, device, requires_grad=s_grad)
    teacher = make(t_shape, t_dtype, t_layout, device, requires_grad=t_grad)
    torch.library.opcheck(kernel(backend), (student, teacher, MODE_IDS[mode], p, REDUCTION_IDS[reduction],
                                            student.requires_grad, teacher.requires_grad))


def check_compiled(backend, device, mode, reduction, compiler):
    """The op under torch.compile(fullgraph=True): the same loss and gradients as eager, and as the oracle."""
    def step(s, t):
        return rkd_fast.feature_distance(s, t, mode=mode, reduction=reduction, backend=backend) * 0.5

    torch._dynamo.reset()
    student = make((3, 4, 5, 5), layout="channels_last", device=device)
    teacher = make(teacher_shape((3, 4, 5, 5), mode), device=device)
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    loss = compiled(student, teacher)
    grads = torch.autograd.grad(loss, (student, teacher))
    eager_loss = step(student, teacher)
    eager_grads = torch.autograd.grad(eager_loss, (student, teacher))
    torch.testing.assert_close(loss, eager_loss)
    for g, eg in zip(grads, eager_grads):
        torch.testing.assert_close(g, eg)
    expected, *expected_grads = oracle(student, teacher, mode=mode, reduction=reduction)
    assert_close(loss, 0.5 * expected, LOSS_TOL[torch.float32], mode=mode, loss=True, what="compiled loss")
    for g, g64 in zip(grads, expected_grads):
        assert_close(g, 0.5 * g64, GRAD_TOL[torch.float32], what="compiled grad")
    torch._dynamo.reset()


@pytest.mark.parametrize("reduction", ("sum", "mean"))
@pytest.mark.parametrize("mode", MODES)
def test_compile_fullgraph(target, mode, reduction):
    # aot_eager runs the same capture as inductor (Dynamo, AOTAutograd, the fake kernel, the autograd formula)
    # without code generation.
    backend, device = target
    check_compiled(backend, device, mode, reduction, "aot_eager")


@pytest.mark.parametrize("mode", ("normalized", "attention"))
def test_compile_inductor_on_gpu(gpu_target, mode):
    backend, device = gpu_target
    check_compiled(backend, device, mode, "mean", "inductor")


def test_compile_inductor(monkeypatch):
    # Inductor on CPU once (its first compile costs 5-35 s on 2 cores, mostly start-up and a cold cache): around
    # the C++ kernel's op when it is built, around the reference's ops otherwise. Its caches do not tell apart the
    # vector ISA that ATEN_CPU_CAPABILITY selects (torch 2.14): a graph compiled under one capability and run under
    # another computes with the wrong vector width (wrong gradients, heap corruption), so one cache per capability.
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "native")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"rkd_fast_inductor_{capability}"))
    cpu_ok = backend_status("feature_distance", "cpu", "cpu") is None
    check_compiled("cpu" if cpu_ok else "reference", "cpu", "attention", "sum", "inductor")


# --- the fused backward: the gradient comes from the forward ----------------------------------------------------

@needs_cpu
def test_backward_of_an_unweighted_loss_costs_nothing():
    # For an upstream gradient of one the backward hands on the gradient the forward wrote: no op runs; for any
    # other upstream gradient, one product.
    student, teacher = make((2, 8, 6, 6), layout="channels_last"), make((2, 8, 6, 6), requires_grad=False)
    loss = rkd_fast.feature_distance(student, teacher, backend="cpu")
    names = ops_run(lambda: torch.autograd.grad(loss, student, retain_graph=True))
    assert not names & ({"aten::mul"} | COPY_OPS), sorted(names)
    names = ops_run(lambda: torch.autograd.grad(loss * 0.5, student))
    assert "aten::mul" in names


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_twice(target, reduction):
    # retain_graph: each backward scales the forward's gradient afresh, and a change to .grad in between (which
    # may share memory with what the first backward returned) does not reach the second.
    backend, device = target
    student, teacher = make((3, 4, 5, 5), device=device), make((3, 4, 5, 5), device=device)
    loss = rkd_fast.feature_distance(student, teacher, reduction=reduction, backend=backend).sum()
    loss.backward(retain_graph=True)
    first = student.grad.clone(), teacher.grad.clone()
    (3 * loss).backward(retain_graph=True)
    for x, g in zip((student, teacher), first):
        torch.testing.assert_close(x.grad, 4 * g)
        x.grad.mul_(0)
    loss.backward()
    for x, g in zip((student, teacher), first):
        torch.testing.assert_close(x.grad, g)


# --- large values, and |F|^p at zero (issue 13 §7) --------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 64, 16, 16), (4, 16, 8, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale", (1e18, 1e20, 1e37))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_large_values(target, mode, dtype, scale, shape):
    skip_large_under_interpreter("feature_distance", target, shape, teacher_shape(shape, mode))
    # Squares of values above ~1.8e19 overflow float32: a kernel redoes such a sample on x/max|x|. The distances
    # are scale-invariant ("normalized", "attention": ≈ 2 and ≈ 0.3 at any scale here), mse scales with scale²
    # (inf where that passes float32's largest value): compared with the oracle on the same values, where nothing
    # overflows.
    backend, device = target
    p = 4.0 if mode == "attention" else 2.0  # |F|^4 overflows float32 from |F| ~ 4e9 on
    student = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device).requires_grad_()
    teacher = (torch.randn(teacher_shape(shape, mode), dtype=torch.float64) * scale).to(dtype).to(device)
    teacher.requires_grad_()
    loss = rkd_fast.feature_distance(student, teacher, mode=mode, p=p, reduction="none", backend=backend)
    grads = torch.autograd.grad(loss.sum(), (student, teacher))
    expected, *expected_grads = oracle(student, teacher, mode=mode, p=p)
    # relative only: the losses are of any size, and ≈ 0 is no scale for them here
    assert_close(loss, expected.to(loss.dtype), (LOSS_TOL[dtype][0], 0.0), floor=0.0, what="loss")
    if not torch.isfinite(loss).all():  # mse from 1e20 on: inf, as float32 must give; its gradient is not checked
        return
    # d loss / dx ~ scale/D in mse, ~ 1/(scale·sqrt(D)) in the others: below the dtype's smallest normal number at
    # the largest scales, where only its absolute error is bounded
    for g, g64 in zip(grads, expected_grads):
        assert torch.isfinite(g).all()
        assert_close(g, g64, GRAD_TOL[dtype], floor=torch.finfo(dtype).tiny, what="grad")


@pytest.mark.parametrize("student_layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("p", (0.25, 0.5, 1.0, 1.5, 2.0))
def test_attention_gradient_at_exact_zeros(target, p, student_layout):
    # ReLU features hold exact zeros, where |F|^p has no derivative for p < 1 (p·0^(p-1) = inf, times sign(0) =
    # NaN): the subgradient 0 is used there (for p >= 1 it is the derivative); everywhere else the gradient is the
    # reference's.
    backend, device = target
    student = make((3, 16, 8, 8), layout=student_layout, device=device, requires_grad=False).relu().requires_grad_()
    teacher = make((3, 6, 8, 8), device=device, requires_grad=False).relu().requires_grad_()
    _, (grad_s, grad_t) = check_op(student, teacher, mode="attention", p=p, backend=backend, reduction="none")
    for x, g in ((student, grad_s), (teacher, grad_t)):
        assert torch.isfinite(g).all()
        assert (g[x == 0] == 0).all()


# --- no hidden copy ------------------------------------------------------------------------------------------

@needs_cpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("channels_last", "channels_last")])
@pytest.mark.parametrize("mode", MODES)
def test_kernel_reads_in_place(mode, layouts, dtype):
    shape = (2, 8, 6, 6)
    student = make(shape, dtype, layouts[0])
    teacher = make(teacher_shape(shape, mode), dtype, layouts[1])
    names = ops_run(lambda: rkd_fast.feature_distance(student, teacher, mode=mode, reduction="none",
                                                       backend="cpu"))
    assert "rkd_fast::feature_distance_fwd" in names  # the kernel did run under the profiler
    assert not names & COPY_OPS, f"copies before or inside the kernel: {sorted(names & COPY_OPS)}"


@needs_cpu
def test_attention_reads_mixed_layouts_in_place():
    student = make((2, 8, 6, 6), layout="channels_last")
    teacher = make((2, 5, 6, 6))
    names = ops_run(lambda: rkd_fast.feature_distance(student, teacher, mode="attention", reduction="none",
                                                       backend="cpu"))
    assert "rkd_fast::feature_distance_fwd" in names and not names & COPY_OPS, sorted(names & COPY_OPS)


@needs_cpu
def test_copy_probe_sees_copies():
    # The probe above must be able to fail: a slice is documented to be copied to contiguous first.
    student, teacher = make((2, 8, 6, 6), layout="slice"), make((2, 8, 6, 6), layout="slice")
    names = ops_run(lambda: rkd_fast.feature_distance(student, teacher, mode="mse", reduction="none",
                                                       backend="cpu"))
    assert names & COPY_OPS


# --- bad input -----------------------------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


BAD_INPUTS = {
    "shape mismatch": (dict(student=_t(2, 3, 4, 4), teacher=_t(2, 3, 4, 5), mode="mse"), ValueError,
                       "equal shapes"),
    "shape mismatch normalized": (dict(student=_t(2, 3, 4, 4), teacher=_t(2, 48)), ValueError, "equal shapes"),
    "batch mismatch": (dict(student=_t(2, 3, 4, 4), teacher=_t(3, 3, 4, 4)), ValueError, "batch sizes differ"),
    "batch mismatch attention": (dict(student=_t(2, 3, 4, 4), teacher=_t(3, 3, 4, 4), mode="attention"),
                                 ValueError, "batch sizes differ"),
    "devices": (dict(student=_t(2, 3), teacher=_t(2, 3, device="meta")), ValueError, "same device"),
    "int student": (dict(student=_t(2, 3, dtype=torch.int64), teacher=_t(2, 3)), TypeError,
                    "student must be a floating-point tensor"),
    "int teacher": (dict(student=_t(2, 3), teacher=_t(2, 3, dtype=torch.int32)), TypeError,
                    "teacher must be a floating-point tensor"),
    "bool": (dict(student=_t(2, 3, dtype=torch.bool), teacher=_t(2, 3)), TypeError, "floating-point"),
    "complex": (dict(student=_t(2, 3, dtype=torch.complex64), teacher=_t(2, 3)), TypeError, "floating-point"),
    "list": (dict(student=[[1.0, 2.0]], teacher=_t(1, 2)), TypeError, "student must be a torch.Tensor"),
    "number": (dict(student=_t(1, 2), teacher=1.0), TypeError, "teacher must be a torch.Tensor"),
    "0-dim": (dict(student=torch.tensor(1.0), teacher=torch.tensor(2.0)), ValueError, "at least 1 dim"),
    "attention 3-D": (dict(student=_t(2, 3, 4), teacher=_t(2, 3, 4), mode="attention"), ValueError, "4-D"),
    "attention 2-D": (dict(student=_t(2, 3), teacher=_t(2, 3), mode="attention"), ValueError, "4-D"),
    "attention H/W": (dict(student=_t(2, 3, 4, 4), teacher=_t(2, 3, 4, 5), mode="attention"), ValueError,
                      "spatial sizes"),
    "p=0": (dict(student=_t(2, 3, 4, 4), teacher=_t(2, 3, 4, 4), mode="attention", p=0), ValueError, "p must"),
    "p<0": (dict(student=_t(2, 3, 4, 4), teacher=_t(2, 3, 4, 4), mode="attention", p=-1.0), ValueError,
            "p must"),
    "p=nan": (dict(student=_t(2, 3, 4, 4), teacher=_t(2, 3, 4, 4), mode="attention", p=math.nan), ValueError,
              "p must"),
    "p=inf": (dict(student=_t(2, 3, 4, 4), teacher=_t(2, 3, 4, 4), mode="attention", p=math.inf), ValueError,
              "p must"),
    "p=str": (dict(student=_t(2, 3, 4, 4), teacher=_t(2, 3, 4, 4), mode="attention", p="2"), ValueError,
              "p must"),
    "p=bool": (dict(student=_t(2, 3, 4, 4), teacher=_t(2, 3, 4, 4), mode="attention", p=True), ValueError,
               "p must"),
    "mode": (dict(student=_t(2, 3), teacher=_t(2, 3), mode="l1"), ValueError, "unknown mode 'l1'"),
    "mode None": (dict(student=_t(2, 3), teacher=_t(2, 3), mode=None), ValueError, "unknown mode"),
    "reduction": (dict(student=_t(2, 3), teacher=_t(2, 3), reduction="avg"), ValueError,
                  "unknown reduction 'avg'"),
    "backend": (dict(student=_t(2, 3), teacher=_t(2, 3), backend="gpu"), ValueError, "unknown backend 'gpu'"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(case):
    kwargs, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        rkd_fast.feature_distance(**kwargs)


def test_kernels_refuse_bad_arguments(kernel_target):
    # The kernel called directly, past the Python checks: every kernel names the problem, with the Python API's
    # exception types.
    backend, device = kernel_target
    for args, error, message in bad_kernel_arguments(torch.randn(2, 3, 4, 5, device=device)):
        with pytest.raises(error, match=message):
            checked_kernel(backend)(*args)


def test_cuda_backend_on_cpu_tensors():
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: .*takes CUDA tensors, got cpu"):
        rkd_fast.feature_distance(_t(2, 3), _t(2, 3), backend="cuda")


def test_triton_backend_on_cpu_tensors_without_interpreter(monkeypatch):
    # Without TRITON_INTERPRET=1 Triton cannot run CPU tensors, GPU or not.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable: .*(TRITON_INTERPRET|not installed)"):
        rkd_fast.feature_distance(_t(2, 3), _t(2, 3), backend="triton")


@pytest.mark.parametrize("mode", ("attention", "normalized"))
def test_losses_are_never_negative(target, mode):
    """Where x̂ = ŷ (1×1 attention maps; parallel features), rounding once left losses near −1.6e−7 (141 of 256
    samples), which loss.sqrt() turns into NaN; the reference gives 0."""
    backend, device = target
    generator = torch.Generator().manual_seed(0)
    student = torch.rand(256, 8, 1, 1, generator=generator) * 3
    teacher = torch.rand(256, 5, 1, 1, generator=generator) * 7
    if mode == "normalized":  # the same direction, another length
        student = torch.rand(256, 4, 3, 3, generator=generator)
        teacher = student * (torch.rand(256, 1, 1, 1, generator=generator) * 9 + 0.5)
    student, teacher = student.to(device).requires_grad_(True), teacher.to(device)
    losses = rkd_fast.feature_distance(student, teacher, mode=mode, reduction="none", backend=backend)
    assert (losses >= 0).all() and losses.max() < 1e-6
    losses.sum().backward()
    assert torch.isfinite(student.grad).all()
