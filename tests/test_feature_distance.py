"""rkd_fast.feature_distance on CPU tensors, backends "reference" and "cpu" (the C++ kernel), against the
oracle: backend="reference" evaluated in float64 on the same input values. The "cpu" cases skip, with the
reason rkd_fast.backends() gives, while the C++ kernel is not built; the reference cases always run.
CUDA cases live in test_feature_distance_gpu.py, Triton ones in tests/triton."""

import math
import os
import tempfile

import pytest
import torch

import rkd_fast
import _feature_distance_contract as contract
from _op_backends import backend_params, kernel_device_params
from rkd_fast.ops import _reference
from rkd_fast.ops.feature_distance import MODE_IDS, REDUCTION_IDS

STATUS, BACKENDS, needs_cpu = backend_params("feature_distance")
CPU_OK = STATUS["cpu"] == "available"

MODES = ("mse", "normalized", "attention")
REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last", "slice", "transposed")

# (rtol, atol as a fraction of the largest expected magnitude), by input dtype. Losses are accumulated in
# float32 from the input values, so they are nearly as exact as float32 whatever the input dtype; gradients
# are rounded to the input dtype (twice: the per-sample unit gradient, then its scale), hence ~2 ulps.
LOSS_TOL = {torch.float64: (1e-9, 1e-12), torch.float32: (2e-5, 1e-6), torch.float16: (1e-3, 1e-4),
            torch.bfloat16: (8e-3, 1e-3)}
GRAD_TOL = {torch.float64: (1e-9, 1e-12), torch.float32: (1e-4, 1e-5), torch.float16: (2e-3, 1e-3),
            torch.bfloat16: (1.6e-2, 8e-3)}


def make(shape, dtype=torch.float32, layout="contiguous", requires_grad=True):
    """A leaf tensor of `shape` with the asked memory layout. The dtype cast happens on the base tensor, since
    `.to()` of a non-dense view would come back contiguous."""
    if layout == "contiguous":
        x = torch.randn(shape).to(dtype)
    elif layout == "channels_last":
        x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    elif layout == "slice":  # every other channel (4-D) or column (2-D): not dense
        x = torch.randn(shape[0], 2 * shape[1], *shape[2:]).to(dtype)[:, 1::2]
    elif layout == "transposed":  # the last two dims swapped: dense, but neither of the two layouts
        x = torch.randn(*shape[:-2], shape[-1], shape[-2]).to(dtype).transpose(-1, -2)
    else:
        raise AssertionError(layout)
    assert x.shape == shape
    if layout in ("slice", "transposed") and x.numel() > 0:
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    return x.detach().requires_grad_(requires_grad)


def teacher_shape(shape, mode):
    # Attention compares spatial maps only: give the teacher another channel count to cover that case.
    return (shape[0], shape[1] + 2, *shape[2:]) if mode == "attention" else shape


def assert_close_scaled(actual, expected, tol):
    rtol, atol = tol
    scale = expected.abs().max().item() if expected.numel() else 0.0
    # The floor covers values that are 0 in exact arithmetic (e.g. the gradient of 'normalized' on 1-element
    # samples), which float32 arithmetic leaves at a few ulps of the unit-sized inputs.
    floor = 1e-12 if actual.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale + floor,
                               check_dtype=False, equal_nan=True)


def check_op(student, teacher, *, mode, backend, reduction="mean", p=2):
    """Runs the op, then checks the loss and the gradient of every input that requires one against the
    float64 reference on the same values (the teacher cast to the student's dtype first, as documented)."""
    loss = rkd_fast.feature_distance(student, teacher, mode=mode, p=p, reduction=reduction, backend=backend)
    s64 = student.detach().double().requires_grad_(student.requires_grad)
    t64 = teacher.detach().to(student.dtype).double().requires_grad_(teacher.requires_grad)
    expected = rkd_fast.feature_distance(s64, t64, mode=mode, p=p, reduction=reduction, backend="reference")

    assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    assert loss.shape == expected.shape == ((student.shape[0],) if reduction == "none" else ())
    assert_close_scaled(loss, expected, LOSS_TOL[student.dtype])

    inputs = [x for x in (student, teacher) if x.requires_grad]
    assert loss.requires_grad == bool(inputs)
    if not inputs:
        return loss, []
    # A different weight per sample checks that the backward scales each sample by its own upstream gradient.
    weight = torch.rand(expected.shape, dtype=torch.float64) + 0.5
    grads = torch.autograd.grad(loss, inputs, weight.to(loss.dtype))
    expected_grads = torch.autograd.grad(expected, [x for x in (s64, t64) if x.requires_grad], weight)
    for x, g, g64 in zip(inputs, grads, expected_grads):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_close_scaled(g, g64, GRAD_TOL[student.dtype])
    return loss, grads


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, mode, reduction, dtype, layout):
    shape = (3, 4, 5, 6)
    student = make(shape, dtype, layout)
    teacher = make(teacher_shape(shape, mode), dtype, layout)
    _, grads = check_op(student, teacher, mode=mode, backend=backend, reduction=reduction)
    # A kernel writes each gradient in its input's layout (torch.autograd.grad returns it as produced; `.grad`
    # would be re-laid-out by AccumulateGrad anyway). The reference's reshapes give contiguous gradients.
    if layout == "channels_last" and backend != "reference":
        for g in grads:
            assert g.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layouts", [("channels_last", "contiguous"), ("contiguous", "channels_last"),
                                     ("slice", "channels_last"), ("channels_last", "transposed")])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_layouts(backend, mode, layouts):
    shape = (2, 3, 4, 5)
    check_op(make(shape, layout=layouts[0]), make(teacher_shape(shape, mode), layout=layouts[1]), mode=mode,
             backend=backend, reduction="none")


@pytest.mark.parametrize("needs", ["student", "teacher", "neither"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_only_one_input_requires_grad(backend, mode, dtype, needs):
    shape = (3, 4, 5, 5)
    student = make(shape, dtype, requires_grad=needs == "student")
    teacher = make(teacher_shape(shape, mode), dtype, requires_grad=needs == "teacher")
    check_op(student, teacher, mode=mode, backend=backend, reduction="sum")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_mode(backend, mode):
    student, teacher = make((2, 3, 4, 4)), make(teacher_shape((2, 3, 4, 4), mode))
    with torch.no_grad():
        loss = rkd_fast.feature_distance(student, teacher, mode=mode, backend=backend)
    assert not loss.requires_grad
    expected = rkd_fast.feature_distance(student.double(), teacher.double(), mode=mode, backend="reference")
    assert_close_scaled(loss, expected, LOSS_TOL[torch.float32])


ODD_SHAPES = [
    (1, 3, 4, 4),       # N = 1
    (7, 13, 5, 3),      # prime sizes
    (4, 5, 1, 1),       # H·W = 1
    (2, 2048, 2, 3),    # C = 2048
    (2, 40, 29, 23),    # many chunks per sample in a parallel kernel (and a tail in each vector loop)
    (5, 37),            # 2-D (N, K)
    (6,),               # 1-D (N,)
]
ODD_CASES = [(shape, mode) for shape in ODD_SHAPES for mode in MODES if mode != "attention" or len(shape) == 4]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape, mode", ODD_CASES, ids=[f"{m}-{'x'.join(map(str, s))}" for s, m in ODD_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes(backend, shape, mode, dtype):
    check_op(make(shape, dtype), make(teacher_shape(shape, mode), dtype), mode=mode, backend=backend,
             reduction="none")


@pytest.mark.parametrize("mode", ("mse", "normalized"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_2d(backend, mode):
    check_op(make((4, 9), layout="transposed"), make((4, 9), layout="transposed"), mode=mode, backend=backend)


@pytest.mark.parametrize("p", (1, 2, 3, 2.5))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_channels_and_p(backend, dtype, p):
    check_op(make((3, 4, 5, 5), dtype), make((3, 7, 5, 5), dtype), mode="attention", p=p, backend=backend,
             reduction="none")


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                    (torch.float32, torch.float64), (torch.float64, torch.float32)], ids=str)
@pytest.mark.parametrize("teacher_grad", (True, False))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend, mode, teacher_grad, dtypes):
    s_dtype, t_dtype = dtypes
    shape = (3, 4, 5, 5)
    student = make(shape, s_dtype)
    teacher = make(teacher_shape(shape, mode), t_dtype, requires_grad=teacher_grad)
    # check_op asserts: loss in float32 (float64 when the student is float64), each gradient in its input's
    # dtype (so the teacher's arrives in t_dtype), values against the reference on the teacher cast to s_dtype.
    check_op(student, teacher, mode=mode, backend=backend, reduction="none")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, mode, reduction):
    student, teacher = make((0, 3, 4, 4)), make(teacher_shape((0, 3, 4, 4), mode))
    loss = rkd_fast.feature_distance(student, teacher, mode=mode, reduction=reduction, backend=backend)
    expected = rkd_fast.feature_distance(student.detach(), teacher.detach(), mode=mode, reduction=reduction,
                                         backend="reference")
    torch.testing.assert_close(loss, expected, equal_nan=True)  # mean: nan, sum: 0, none: shape (0,)
    grads = torch.autograd.grad(loss.sum(), (student, teacher))
    assert grads[0].shape == student.shape and grads[1].shape == teacher.shape


@pytest.mark.parametrize("value", (math.nan, math.inf, -math.inf))
@pytest.mark.parametrize("where", ("student", "teacher"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_propagate(backend, mode, where, value):
    shape = (3, 4, 5, 5)
    inputs = {"student": make(shape, requires_grad=False), "teacher": make(teacher_shape(shape, mode),
                                                                              requires_grad=False)}
    inputs[where][1, 2, 3, 4] = value  # one element of sample 1
    losses = rkd_fast.feature_distance(inputs["student"], inputs["teacher"], mode=mode, reduction="none",
                                       backend=backend)
    expected = rkd_fast.feature_distance(inputs["student"].double(), inputs["teacher"].double(), mode=mode,
                                         reduction="none", backend="reference")
    assert not torch.isfinite(expected[1]), "the oracle itself should give a non-finite loss"
    assert not torch.isfinite(losses[1]), f"sample 1 holds {value} but its loss is {losses[1].item()}"
    torch.testing.assert_close(losses[[0, 2]].double(), expected[[0, 2]], rtol=2e-5, atol=1e-6)
    for reduction in ("mean", "sum"):
        loss = rkd_fast.feature_distance(inputs["student"], inputs["teacher"], mode=mode, reduction=reduction,
                                         backend=backend)
        assert not torch.isfinite(loss), f"reduction={reduction!r} gave {loss.item()}"


@pytest.mark.parametrize("which", ("student", "teacher", "both"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_sample(backend, mode, which):
    # A zero sample has norm 0: the normalisations divide by the 1e-12 floor instead (loss 1 against a nonzero
    # sample, 0 against zero), with finite gradients, as torch.nn.functional.normalize does.
    shape = (3, 4, 5, 5)
    student, teacher = make(shape, requires_grad=False), make(teacher_shape(shape, mode), requires_grad=False)
    if which in ("student", "both"):
        student[1] = 0
    if which in ("teacher", "both"):
        teacher[1] = 0
    _, grads = check_op(student.requires_grad_(), teacher.requires_grad_(), mode=mode, backend=backend,
                        reduction="none")
    assert all(torch.isfinite(g).all() for g in grads)


# --- gradcheck, opcheck, torch.compile ---------------------------------------------------------------------

GRADCHECK_CASES = [("mse", 2), ("normalized", 2), ("attention", 0.5), ("attention", 1), ("attention", 2),
                   ("attention", 3)]


@pytest.mark.parametrize("mode, p", GRADCHECK_CASES, ids=[f"{m}-p{p}" for m, p in GRADCHECK_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend, mode, p):
    student = make((2, 3, 3, 2), torch.float64)
    teacher = make(teacher_shape((2, 3, 3, 2), mode), torch.float64)
    for reduction in ("none", "mean"):
        assert torch.autograd.gradcheck(
            lambda s, t: rkd_fast.feature_distance(s, t, mode=mode, p=p, reduction=reduction, backend=backend),
            (student, teacher))


def _opcheck_samples():
    return [
        (make((3, 4, 5, 6)), make((3, 4, 5, 6)), "mse", 2.0, "mean"),
        (make((2, 3, 4, 4), layout="channels_last"), make((2, 3, 4, 4), layout="channels_last",
                                                           requires_grad=False), "normalized", 2.0, "sum"),
        (make((2, 3, 4, 4), requires_grad=False), make((2, 5, 4, 4)), "attention", 3.0, "none"),
        (make((2, 3, 4, 4), torch.bfloat16), make((2, 6, 4, 4), torch.bfloat16, "channels_last"), "attention",
         1.0, "mean"),
        (make((4, 10), torch.float64), make((4, 10), torch.float64), "normalized", 2.0, "none"),
    ]


@needs_cpu
@pytest.mark.parametrize("index", range(5))
def test_opcheck(index):
    student, teacher, mode, p, reduction = _opcheck_samples()[index]
    torch.library.opcheck(torch.ops.rkd_fast.feature_distance_fwd,
                          (student, teacher, MODE_IDS[mode], p, REDUCTION_IDS[reduction], student.requires_grad,
                           teacher.requires_grad))


def check_compiled(backend, mode, compiler):
    def step(s, t):
        return rkd_fast.feature_distance(s, t, mode=mode, reduction="sum", backend=backend) * 0.5

    torch._dynamo.reset()
    student = make((3, 4, 5, 5), layout="channels_last")
    teacher = make(teacher_shape((3, 4, 5, 5), mode))
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    loss = compiled(student, teacher)
    grads = torch.autograd.grad(loss, (student, teacher))
    eager_loss = step(student, teacher)
    eager_grads = torch.autograd.grad(eager_loss, (student, teacher))
    torch.testing.assert_close(loss, eager_loss)
    for g, eg in zip(grads, eager_grads):
        torch.testing.assert_close(g, eg)
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, mode):
    # aot_eager runs the same capture as inductor (Dynamo, AOTAutograd, the fake kernel, the autograd
    # formula) without code generation.
    check_compiled(backend, mode, "aot_eager")


def test_compile_inductor(monkeypatch):
    # Inductor once (its first compile costs 5-35 s on 2 cores, mostly start-up and a cold cache): around the
    # C++ kernel's op when it is built, around the reference's ops otherwise. Its caches do not tell apart the
    # vector ISA that ATEN_CPU_CAPABILITY selects (torch 2.14): a graph compiled under one capability and run under
    # another computes with the wrong vector width (wrong gradients, heap corruption), so one cache per capability.
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "native")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"rkd_fast_inductor_{capability}"))
    check_compiled("cpu" if CPU_OK else "reference", "attention", "inductor")


# --- the fused backward: the gradient comes from the forward ----------------------------------------------------

@needs_cpu
def test_backward_of_an_unweighted_loss_costs_nothing():
    # For an upstream gradient of one the backward hands on the gradient the forward wrote: no op runs; for any
    # other upstream gradient, one product.
    student, teacher = make((2, 8, 6, 6), layout="channels_last"), make((2, 8, 6, 6), requires_grad=False)
    loss = rkd_fast.feature_distance(student, teacher, backend="cpu")
    names = _ops_run(lambda: torch.autograd.grad(loss, student, retain_graph=True))
    assert not names & ({"aten::mul"} | COPY_OPS), sorted(names)
    names = _ops_run(lambda: torch.autograd.grad(loss * 0.5, student))
    assert "aten::mul" in names


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice(backend, reduction):
    # retain_graph: each backward scales the forward's gradient afresh, and a change to .grad in between (which
    # may share memory with what the first backward returned) does not reach the second.
    student, teacher = make((3, 4, 5, 5)), make((3, 4, 5, 5))
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

def _sum_tol(dtype, terms):
    """Relative error to allow for a result of `terms` products of `dtype` values summed in float32 (float64 for
    float64) and rounded to `dtype`: a few roundings of the result, and sqrt(terms) of the sum."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return 4 * torch.finfo(dtype).eps + 4 * torch.finfo(acc).eps * math.sqrt(terms)


@pytest.mark.parametrize("scale", (1e18, 1e20, 1e37))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_values(backend, mode, dtype, scale):
    # Squares of values above ~1.8e19 overflow float32. The distances are scale-invariant ("normalized",
    # "attention": ≈ 2 and ≈ 0.3 at any scale here), mse scales with scale² (inf where that passes float32's
    # largest value): compared with the float64 reference on the same values, where nothing overflows, and the
    # gradients compared after scaling them to O(1).
    p = 4.0 if mode == "attention" else 2.0  # |F|^4 overflows float32 from |F| ~ 4e9 on
    shape = (2, 64, 16, 16)
    student = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    teacher = (torch.randn(teacher_shape(shape, mode), dtype=torch.float64) * scale).to(dtype).requires_grad_()
    loss = rkd_fast.feature_distance(student, teacher, mode=mode, p=p, reduction="none", backend=backend)
    grads = torch.autograd.grad(loss.sum(), (student, teacher))
    s64, t64 = (x.detach().double().requires_grad_() for x in (student, teacher))
    expected = _reference.feature_distance(s64, t64, mode=mode, p=p, reduction="none")
    expected_grads = torch.autograd.grad(expected.sum(), (s64, t64))

    tol = _sum_tol(dtype, math.prod(shape[1:]))
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=tol, atol=0)
    if not torch.isfinite(loss).all():  # mse from 1e20 on: inf, as float32 must give; its gradient is not checked
        return
    # d loss / dx ~ scale/D in mse, ~ 1/(scale·sqrt(D)) in the others: below the dtype's smallest normal number at
    # the largest scales, where only its absolute error is bounded
    for g, g64 in zip(grads, expected_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), g64, rtol=tol,
                                   atol=tol * g64.abs().max().item() + torch.finfo(dtype).tiny)


@pytest.mark.parametrize("p", (0.25, 0.5, 1.0))
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_gradient_at_exact_zeros(backend, p):
    # ReLU features hold exact zeros, where |F|^p has no derivative for p < 1 (p·0^(p-1) = inf, times sign(0) =
    # NaN): the subgradient 0 is used there; everywhere else the gradient is the reference's.
    student = make((3, 4, 5, 5), requires_grad=False).relu().requires_grad_()
    teacher = make((3, 6, 5, 5), requires_grad=False).relu().requires_grad_()
    _, (grad_s, grad_t) = check_op(student, teacher, mode="attention", p=p, backend=backend, reduction="none")
    for x, g in ((student, grad_s), (teacher, grad_t)):
        assert torch.isfinite(g).all()
        assert (g[x == 0] == 0).all()


# --- no hidden copy ------------------------------------------------------------------------------------------

COPY_OPS = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"}  # aten::to may return self


def _ops_run(fn):
    # Callers use reduction="none": a mean's division by N converts the scalar with a (tiny) aten::_to_copy.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@needs_cpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("channels_last", "channels_last")])
@pytest.mark.parametrize("mode", MODES)
def test_kernel_reads_in_place(mode, layouts, dtype):
    shape = (2, 8, 6, 6)
    student = make(shape, dtype, layouts[0])
    teacher = make(teacher_shape(shape, mode), dtype, layouts[1])
    names = _ops_run(lambda: rkd_fast.feature_distance(student, teacher, mode=mode, reduction="none",
                                                        backend="cpu"))
    assert "rkd_fast::feature_distance_fwd" in names  # the kernel did run under the profiler
    assert not names & COPY_OPS, f"copies before or inside the kernel: {sorted(names & COPY_OPS)}"


@needs_cpu
def test_attention_reads_mixed_layouts_in_place():
    student = make((2, 8, 6, 6), layout="channels_last")
    teacher = make((2, 5, 6, 6))
    names = _ops_run(lambda: rkd_fast.feature_distance(student, teacher, mode="attention", reduction="none",
                                                        backend="cpu"))
    assert "rkd_fast::feature_distance_fwd" in names and not names & COPY_OPS, sorted(names & COPY_OPS)


@needs_cpu
def test_copy_probe_sees_copies():
    # The probe above must be able to fail: a slice is documented to be copied to contiguous first.
    student, teacher = make((2, 8, 6, 6), layout="slice"), make((2, 8, 6, 6), layout="slice")
    names = _ops_run(lambda: rkd_fast.feature_distance(student, teacher, mode="mse", reduction="none",
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


@pytest.mark.parametrize("device", kernel_device_params("feature_distance"))
def test_kernels_refuse_bad_arguments(device):
    # The op called directly, past the Python checks: the C++ checks (csrc/input_checks.cpp, one definition for
    # the CPU and CUDA kernels) name the problem, with the Python API's exception types.
    for args, error, message in contract.forward_cases(torch.randn(2, 3, 4, 5, device=device)):
        with pytest.raises(error, match=message):
            torch.ops.rkd_fast.feature_distance_fwd(*args)


def test_cuda_backend_on_cpu_tensors():
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: .*takes CUDA tensors, got cpu"):
        rkd_fast.feature_distance(_t(2, 3), _t(2, 3), backend="cuda")


def test_triton_backend_on_cpu_tensors_without_interpreter(monkeypatch):
    # Without TRITON_INTERPRET=1 Triton cannot run CPU tensors, GPU or not.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable: .*(TRITON_INTERPRET|not installed)"):
        rkd_fast.feature_distance(_t(2, 3), _t(2, 3), backend="triton")
