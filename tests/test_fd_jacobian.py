"""rkd_fast.fd_jacobian_loss on CPU, every backend that can run here, against the oracle: backend="reference"
evaluated in float64 on the same input values. The "cpu" cases skip (with the reason) while the C++ kernel is
not built; the reference cases always run. Triton cases live in tests/triton, CUDA cases in
test_fd_jacobian_gpu.py."""

import math

import pytest
import torch

import rkd_fast
from _op_backends import backend_params, kernel_device_params
from rkd_fast.ops._reference import fd_jacobian as reference
from rkd_fast.ops.fd_jacobian import options

STATUS, BACKENDS, needs_cpu = backend_params("fd_jacobian")
CPU_OK = STATUS["cpu"] == "available"

ON = ("logits", "probs")
REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (rtol, atol as a fraction of the largest expected magnitude), by input dtype. The differences are taken in
# float32 from the input values, so losses are nearly as exact as float32 whatever the input dtype; gradients
# are rounded to the input dtype (twice: the per-sample unit gradient, then its scale).
LOSS_TOL = {torch.float64: (1e-9, 1e-12), torch.float32: (5e-5, 1e-6), torch.float16: (5e-5, 1e-6),
            torch.bfloat16: (5e-5, 1e-6)}
GRAD_TOL = {torch.float64: (1e-9, 1e-12), torch.float32: (1e-4, 1e-5), torch.float16: (2e-3, 1e-3),
            torch.bfloat16: (1.6e-2, 8e-3)}


def make_pair(n, k, dtype=torch.float32, step=0.05, requires_grad=True):
    """Outputs at x and at x + h·d: the second is the first plus a change of about the size of the step, as a
    smooth model gives, so (s_pert - s_clean)/h is O(1)."""
    clean = 2 * torch.randn(n, k)
    pert = clean + step * torch.randn(n, k)
    return (clean.to(dtype).requires_grad_(requires_grad), pert.to(dtype).requires_grad_(requires_grad))


def make_h(kind, n, requires_grad=False):
    if kind == "float":
        return 0.05
    if kind == "0-d tensor":
        return torch.tensor(0.04).requires_grad_(requires_grad)
    return (0.03 + 0.04 * torch.rand(n)).requires_grad_(requires_grad)


def assert_close_scaled(actual, expected, tol):
    rtol, atol = tol
    scale = expected.abs().max().item() if expected.numel() else 0.0
    floor = 1e-12 if actual.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale + floor,
                               check_dtype=False, equal_nan=True)


def _f64(x):
    return None if x is None else x.detach().double().requires_grad_(x.requires_grad)


def check_op(s_clean, s_pert, h, *, teacher=None, on="logits", temperature=1.0, reduction="mean", backend):
    """Runs the op, then checks the loss and the gradient of every input that requires one (s_clean, s_pert,
    a tensor h) against the float64 reference on the same values."""
    t_clean, t_pert = teacher if teacher is not None else (None, None)
    loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, h, t_clean=t_clean, t_pert=t_pert, on=on,
                                     temperature=temperature, reduction=reduction, backend=backend)
    h64 = _f64(h) if isinstance(h, torch.Tensor) else h
    args64 = (_f64(s_clean), _f64(s_pert), h64, _f64(t_clean), _f64(t_pert))
    expected = reference(*args64, on=on, temperature=temperature, reduction=reduction)

    acc = torch.float64 if s_clean.dtype == torch.float64 else torch.float32
    assert loss.dtype == acc
    assert loss.shape == expected.shape == ((s_clean.shape[0],) if reduction == "none" else ())
    assert_close_scaled(loss, expected, LOSS_TOL[s_clean.dtype])

    inputs = [x for x in (s_clean, s_pert, h) if isinstance(x, torch.Tensor) and x.requires_grad]
    assert loss.requires_grad == bool(inputs)
    if not inputs:
        return loss
    # A different weight per sample checks that the backward scales each sample by its own upstream gradient.
    weight = torch.rand(expected.shape, dtype=torch.float64) + 0.5
    grads = torch.autograd.grad(loss, inputs, weight.to(loss.dtype))
    expected_grads = torch.autograd.grad(
        expected, [x for x in args64[:3] if isinstance(x, torch.Tensor) and x.requires_grad], weight)
    for x, g, g64 in zip(inputs, grads, expected_grads):
        assert g.dtype == x.dtype and g.shape == x.shape
        tol = GRAD_TOL[s_clean.dtype] if x is not h else LOSS_TOL[torch.float32]
        assert_close_scaled(g, g64, tol)
    return loss


@pytest.mark.parametrize("h_kind", ("float", "tensor", "0-d tensor"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_teacher", (False, True), ids=("penalty", "matching"))
@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, on, with_teacher, reduction, dtype, h_kind):
    n, k = 6, 10
    s_clean, s_pert = make_pair(n, k, dtype)
    teacher = make_pair(n, k, dtype, requires_grad=False) if with_teacher else None
    check_op(s_clean, s_pert, make_h(h_kind, n, requires_grad=True), teacher=teacher, on=on, temperature=2.0,
             reduction=reduction, backend=backend)


ODD_SHAPES = [(1, 1), (1, 7), (5, 1), (3, 1000), (33, 17), (0, 10), (4, 0)]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("with_teacher", (False, True), ids=("penalty", "matching"))
@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes(backend, shape, on, with_teacher, dtype):
    n, k = shape
    s_clean, s_pert = make_pair(n, k, dtype)
    teacher = make_pair(n, k, dtype, requires_grad=False) if with_teacher else None
    for reduction in ("none", "sum"):
        check_op(s_clean, s_pert, make_h("tensor", n), teacher=teacher, on=on, reduction=reduction,
                 backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_of_empty_batch_is_nan(backend):
    s_clean, s_pert = make_pair(0, 10)
    loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.1, backend=backend)
    assert torch.isnan(loss)


@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_model_gives_exact_directional_derivative(backend, on):
    # An independent check of the definition (not of one implementation against another): for a linear model
    # s = x W the finite difference is exact, (s(x + h·d) - s(x))/h = d W, so on="logits" gives ‖d W‖²
    # and, with a teacher V, ‖d W - d V‖²; on="probs" gives ‖J_softmax(d W)‖² only as h → 0, so it is
    # compared with torch.func.jvp at a small step.
    torch.manual_seed(1)
    x, d = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    w, v = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    h = 1e-6 if on == "probs" else 0.25
    losses = rkd_fast.fd_jacobian_loss(x @ w, (x + h * d) @ w, h, t_clean=x @ v, t_pert=(x + h * d) @ v, on=on,
                                       reduction="none", backend=backend)
    if on == "logits":
        expected = (d @ w - d @ v).pow(2).sum(dim=1)
    else:
        _, jw = torch.func.jvp(lambda z: torch.softmax(z @ w, dim=1), (x,), (d,))
        _, jv = torch.func.jvp(lambda z: torch.softmax(z @ v, dim=1), (x,), (d,))
        expected = (jw - jv).pow(2).sum(dim=1)
    torch.testing.assert_close(losses, expected, rtol=1e-5 if on == "probs" else 1e-12, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_only_changes_probs(backend):
    s_clean, s_pert = make_pair(3, 8, requires_grad=False)
    logits = [rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.1, on="logits", temperature=t, backend=backend)
              for t in (1.0, 4.0)]
    probs = [rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.1, on="probs", temperature=t, backend=backend)
             for t in (1.0, 4.0)]
    torch.testing.assert_close(logits[0], logits[1])
    assert not torch.allclose(probs[0], probs[1])
    expected = reference(s_clean.double(), s_pert.double(), 0.1, on="probs", temperature=4.0)
    assert_close_scaled(probs[1], expected, LOSS_TOL[torch.float32])


@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_softmax_stays_finite(backend, on):
    # Max-subtraction in the softmax: logits of 1e4 would overflow exp() without it.
    s_clean, s_pert = make_pair(3, 20, requires_grad=True)
    with torch.no_grad():
        s_clean.add_(1e4)
        s_pert.add_(1e4)
    check_op(s_clean, s_pert, 0.05, on=on, temperature=0.5, reduction="none", backend=backend)


@pytest.mark.parametrize("layout", ("row_slice", "transposed", "column_slice"))
@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend, on, layout):
    # row_slice (rows of a wider tensor, unit-stride) is read in place; the others are copied to contiguous.
    def view(x):
        if layout == "row_slice":
            return torch.cat([x, torch.randn(x.shape[0], 3)], dim=1)[:, :x.shape[1]]
        if layout == "transposed":
            return x.t().contiguous().t()
        return torch.stack([x, torch.randn_like(x)], dim=2)[:, :, 0]

    s_clean, s_pert = (view(x).requires_grad_() for x in make_pair(5, 9, requires_grad=False))
    t_clean, t_pert = (view(x) for x in make_pair(5, 9, requires_grad=False))
    assert not s_clean.is_contiguous()
    check_op(s_clean, s_pert, make_h("tensor", 5), teacher=(t_clean, t_pert), on=on, reduction="none",
             backend=backend)


@pytest.mark.parametrize("needs", ("clean", "pert", "neither"))
@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("backend", BACKENDS)
def test_only_one_input_requires_grad(backend, on, needs):
    s_clean, s_pert = make_pair(4, 7, requires_grad=False)
    s_clean.requires_grad_(needs == "clean")
    s_pert.requires_grad_(needs == "pert")
    check_op(s_clean, s_pert, 0.05, teacher=make_pair(4, 7, requires_grad=False), on=on, reduction="sum",
             backend=backend)


@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient(backend, on):
    s_clean, s_pert = make_pair(4, 7)
    t_clean, t_pert = make_pair(4, 7, requires_grad=True)  # requires grad, yet is a constant target
    loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.05, t_clean=t_clean, t_pert=t_pert, on=on,
                                     backend=backend)
    loss.backward()
    assert t_clean.grad is None and t_pert.grad is None
    assert s_clean.grad is not None and s_pert.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_gradients_are_opposite(backend):
    s_clean, s_pert = make_pair(4, 7)
    grads = torch.autograd.grad(rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.05, backend=backend),
                                (s_clean, s_pert))
    torch.testing.assert_close(grads[0], -grads[1])


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_are_promoted(backend, dtypes):
    student_dtype, teacher_dtype = dtypes
    s_clean, s_pert = make_pair(3, 6, student_dtype)
    t_clean, t_pert = make_pair(3, 6, teacher_dtype, requires_grad=False)
    loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.05, t_clean=t_clean, t_pert=t_pert, on="probs",
                                     backend=backend)
    common = torch.promote_types(student_dtype, teacher_dtype)
    assert loss.dtype == (torch.float64 if common == torch.float64 else torch.float32)
    expected = reference(s_clean.double(), s_pert.double(), 0.05, t_clean.double(), t_pert.double(), on="probs")
    assert_close_scaled(loss, expected, LOSS_TOL[torch.float32])
    grads = torch.autograd.grad(loss, (s_clean, s_pert))
    assert all(g.dtype == student_dtype for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_mode(backend):
    s_clean, s_pert = make_pair(3, 6)
    with torch.no_grad():
        loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.05, on="probs", backend=backend)
    assert not loss.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_propagates(backend):
    s_clean, s_pert = make_pair(3, 6, requires_grad=False)
    s_pert[1, 2] = math.nan
    for on in ON:
        losses = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.05, on=on, reduction="none", backend=backend)
        assert torch.isnan(losses[1]) and torch.isfinite(losses[[0, 2]]).all()


# --- the fused backward: the gradients come from the forward ---------------------------------------------------

@needs_cpu
def test_backward_of_an_unweighted_loss_costs_nothing():
    # For an upstream gradient of one the backward hands on the gradients the forward wrote: no op runs.
    s_clean, s_pert = make_pair(4, 7)
    loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.05, backend="cpu")
    names = _ops_run(lambda: torch.autograd.grad(loss, (s_clean, s_pert), retain_graph=True))
    assert not names & ({"aten::mul"} | COPY_OPS), sorted(names)
    assert "aten::mul" in _ops_run(lambda: torch.autograd.grad(loss * 0.5, (s_clean, s_pert)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice(backend, reduction):
    # retain_graph: each backward scales the forward's gradients afresh, and a change to .grad in between (which
    # may share memory with what the first backward returned) does not reach the second.
    s_clean, s_pert = make_pair(4, 7)
    h = make_h("tensor", 4, requires_grad=True)
    loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, h, on="probs", reduction=reduction, backend=backend).sum()
    loss.backward(retain_graph=True)
    first = [x.grad.clone() for x in (s_clean, s_pert, h)]
    (3 * loss).backward(retain_graph=True)
    for x, g in zip((s_clean, s_pert, h), first):
        torch.testing.assert_close(x.grad, 4 * g)
        x.grad.mul_(0)
    loss.backward()
    for x, g in zip((s_clean, s_pert, h), first):
        torch.testing.assert_close(x.grad, g)


# --- large values (issue 13 §7) ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_large_step_in_float64(backend):
    # float64 holds h = 1e150 and the loss it gives, ~1e-300 per element: no silent 0.
    s_clean, s_pert = make_pair(3, 6, torch.float64, requires_grad=False)
    losses = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 1e150, reduction="none", backend=backend)
    expected = (((s_pert - s_clean) * 1e-75) ** 2).sum(dim=1) * 1e-150  # ‖d‖² / h², scaled to stay in range
    assert (losses > 0).all()
    torch.testing.assert_close(losses, expected, rtol=8 * torch.finfo(torch.float64).eps, atol=0)


@pytest.mark.parametrize("h", (1e300, 1e-40, torch.tensor([0.1, 1e300], dtype=torch.float64)),
                         ids=("1e300", "1e-40", "float64 tensor"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_outside_the_accumulation_range_is_refused(backend, h):
    # float32 inputs are computed in float32, where h = 1e300 is inf (the loss silently 0) and 1/1e-40 is inf.
    s_clean, s_pert = make_pair(2, 5)
    with pytest.raises(ValueError, match="outside the range of torch.float32"):
        rkd_fast.fd_jacobian_loss(s_clean, s_pert, h, backend=backend)


# --- gradcheck, opcheck, torch.compile ---------------------------------------------------------------------

@pytest.mark.parametrize("with_teacher", (False, True), ids=("penalty", "matching"))
@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend, on, with_teacher):
    s_clean, s_pert = make_pair(3, 5, torch.float64, step=0.2)
    teacher = make_pair(3, 5, torch.float64, step=0.2, requires_grad=False) if with_teacher else (None, None)
    h = make_h("tensor", 3, requires_grad=True).double().detach().requires_grad_()
    for reduction in ("none", "mean"):
        assert torch.autograd.gradcheck(
            lambda a, b, step: rkd_fast.fd_jacobian_loss(a, b, step, t_clean=teacher[0], t_pert=teacher[1], on=on,
                                                         temperature=1.5, reduction=reduction, backend=backend),
            (s_clean, s_pert, h))


def _opcheck_samples():
    def h(n, dtype=torch.float32):
        return (0.03 + 0.04 * torch.rand(n, dtype=dtype)).requires_grad_()

    return [  # h gets a gradient from reduction "none" only (fd_jacobian_loss reduces those itself)
        (*make_pair(4, 10), h(4).detach(), None, None, "logits", 1.0, "mean"),
        (*make_pair(4, 10), h(4), *make_pair(4, 10, requires_grad=False), "probs", 2.0, "none"),
        (*make_pair(3, 7, torch.bfloat16), h(3).detach(), *make_pair(3, 7, torch.bfloat16, requires_grad=False),
         "probs", 1.0, "sum"),
        (*make_pair(3, 7, torch.float16), torch.tensor(0.05), None, None, "logits", 1.0, "mean"),
        (*make_pair(2, 5, torch.float64), h(2, torch.float64), *make_pair(2, 5, torch.float64,
                                                                          requires_grad=False),
         "logits", 1.0, "none"),
    ]


@needs_cpu
@pytest.mark.parametrize("index", range(5))
def test_opcheck(index):
    s_clean, s_pert, h, t_clean, t_pert, on, temperature, reduction = _opcheck_samples()[index]
    torch.library.opcheck(torch.ops.rkd_fast.fd_jacobian_fwd,
                          (s_clean, s_pert, h, t_clean, t_pert, temperature,
                           options(on, reduction, s_clean.requires_grad, s_pert.requires_grad)))


@pytest.mark.parametrize("h_kind", ("float", "tensor"))
@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, on, h_kind):
    def step(s_clean, s_pert, h, t_clean, t_pert):
        return rkd_fast.fd_jacobian_loss(s_clean, s_pert, h, t_clean=t_clean, t_pert=t_pert, on=on,
                                         reduction="sum", backend=backend) * 0.5

    torch._dynamo.reset()
    s_clean, s_pert = make_pair(4, 9)
    t_clean, t_pert = make_pair(4, 9, requires_grad=False)
    h = make_h(h_kind, 4)
    # aot_eager runs the same graph capture (Dynamo + AOTAutograd, the fake kernel, the autograd formula) as
    # inductor without its C++ code generation, which takes minutes on 2 cores.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(s_clean, s_pert, h, t_clean, t_pert)
    grads = torch.autograd.grad(loss, (s_clean, s_pert))
    eager_loss = step(s_clean, s_pert, h, t_clean, t_pert)
    eager_grads = torch.autograd.grad(eager_loss, (s_clean, s_pert))
    torch.testing.assert_close(loss, eager_loss)
    for g, eg in zip(grads, eager_grads):
        torch.testing.assert_close(g, eg)
    torch._dynamo.reset()


# --- the kernel path --------------------------------------------------------------------------------------------

COPY_OPS = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"}


def _ops_run(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@needs_cpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_kernel_reads_in_place(dtype):
    s_clean, s_pert = make_pair(4, 12, dtype)
    wide = torch.randn(4, 20).to(dtype)
    t_clean, t_pert = wide[:, :12], wide[:, 8:]  # unit-stride rows of a wider tensor
    names = _ops_run(lambda: rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.1, t_clean=t_clean, t_pert=t_pert,
                                                       on="probs", reduction="none", backend="cpu"))
    # reduction="none": the mean's own scalar cast would show up as a copy.
    assert "rkd_fast::fd_jacobian_fwd" in names  # the kernel did run under the profiler
    assert not names & COPY_OPS, f"copies before or inside the kernel: {sorted(names & COPY_OPS)}"


@needs_cpu
def test_copy_probe_sees_copies():
    # The probe above must be able to fail: column-major inputs are documented to be copied to contiguous.
    s_clean, s_pert = (x.t().contiguous().t() for x in make_pair(4, 12, requires_grad=False))
    names = _ops_run(lambda: rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.1, reduction="none", backend="cpu"))
    assert "rkd_fast::fd_jacobian_fwd" in names and names & COPY_OPS


@needs_cpu
def test_auto_uses_the_cpu_kernel():
    s_clean, s_pert = make_pair(2, 5)
    names = _ops_run(lambda: rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.1))
    assert "rkd_fast::fd_jacobian_fwd" in names


# --- bad input -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", kernel_device_params("fd_jacobian"))
def test_kernel_refuses_bad_arguments(device):
    # The op called directly, past the Python checks: the C++ checks (csrc/input_checks.cpp, one definition for
    # the CPU and CUDA kernels) name the problem, with the Python API's exception types.
    op = torch.ops.rkd_fast.fd_jacobian_fwd
    s, p = (x.to(device) for x in make_pair(3, 5, requires_grad=False))
    h = torch.full((3,), 0.1, device=device)
    logits, probs = options("logits", "mean", False, False), options("probs", "mean", False, False)
    cases = [
        ((s, p[:2], h, None, None, 1.0, logits), ValueError, "s_pert must have shape"),
        ((s, p.double(), h, None, None, 1.0, logits), TypeError, "s_pert must have dtype"),
        ((s.int(), p.int(), h, None, None, 1.0, logits), TypeError, "unsupported dtype Int"),
        ((s, p, h, s, None, 1.0, logits), ValueError, "give both t_clean and t_pert"),
        ((s, p, h, s.t().contiguous().t(), p, 1.0, logits), ValueError, "t_clean rows must be unit-stride"),
        ((s, p, h, None, None, 1.0, 32), ValueError, "options must be"),
        ((s, p, h, None, None, 1.0, 3 << 1), ValueError, "reduction must be"),
        ((s, p, h, None, None, 0.0, probs), ValueError, "temperature must be > 0"),
        ((s, p, h.double(), None, None, 1.0, logits), ValueError, "h must be a contiguous tensor of shape"),
        ((s, p, h[:2], None, None, 1.0, logits), ValueError, "h must be a contiguous tensor of shape"),
        ((s[:, 0], p[:, 0], h, None, None, 1.0, logits), ValueError, "s_clean must be 2-D"),
    ]
    if device == "cuda":  # the dispatcher picks the CUDA kernel for a CPU tensor beside a CUDA one
        cases.append(((s, p.cpu(), h, None, None, 1.0, logits), ValueError, "s_pert must be on cuda"))
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            op(*args)


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


BAD_INPUTS = {
    "1-D": (dict(s_clean=_t(6), s_pert=_t(6)), ValueError, r"s_clean must be 2-D \(N, K\)"),
    "3-D": (dict(s_clean=_t(2, 3, 4), s_pert=_t(2, 3, 4)), ValueError, "must be 2-D"),
    "shape mismatch": (dict(s_clean=_t(2, 3), s_pert=_t(2, 4)), ValueError, "one shape"),
    "batch mismatch": (dict(s_clean=_t(2, 3), s_pert=_t(3, 3)), ValueError, "one shape"),
    "teacher shape": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), t_clean=_t(2, 4), t_pert=_t(2, 4)), ValueError,
                      "one shape"),
    "teacher 1-D": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), t_clean=_t(6), t_pert=_t(6)), ValueError,
                    "t_clean must be 2-D"),
    "only t_clean": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), t_clean=_t(2, 3)), ValueError,
                     "both t_clean and t_pert"),
    "only t_pert": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), t_pert=_t(2, 3)), ValueError,
                    "both t_clean and t_pert"),
    "int student": (dict(s_clean=_t(2, 3, dtype=torch.int64), s_pert=_t(2, 3)), TypeError,
                    "s_clean must be a floating-point tensor"),
    "int teacher": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), t_clean=_t(2, 3), t_pert=_t(2, 3, dtype=torch.int32)),
                    TypeError, "t_pert must be a floating-point tensor"),
    "complex": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3, dtype=torch.complex64)), TypeError, "floating-point"),
    "list": (dict(s_clean=[[1.0, 2.0]], s_pert=_t(1, 2)), TypeError, "s_clean must be a torch.Tensor"),
    "devices": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3, device="meta")), ValueError, "same device"),
    "teacher device": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), t_clean=_t(2, 3, device="meta"),
                            t_pert=_t(2, 3, device="meta")), ValueError, "same device"),
    "h device": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), h=torch.ones(2, device="meta")), ValueError,
                 "same device"),
    "h=0": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), h=0.0), ValueError, "h must be finite and > 0"),
    "h<0": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), h=-0.1), ValueError, "h must be finite and > 0"),
    "h=nan": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), h=math.nan), ValueError, "h must be finite"),
    "h=inf": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), h=math.inf), ValueError, "h must be finite"),
    "h tensor 0": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), h=torch.tensor([0.1, 0.0])), ValueError,
                   "h must be finite and > 0, got 0.0 at index 1"),
    "h tensor nan": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), h=torch.tensor([math.nan, 0.1])), ValueError,
                     "h must be finite"),
    "h 0-d tensor <0": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), h=torch.tensor(-1.0)), ValueError,
                        "h must be finite and > 0"),
    "h tensor shape": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), h=torch.ones(3)), ValueError,
                       r"shape \(\) or \(N,\) = \(2,\)"),
    "h tensor 2-D": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), h=torch.ones(2, 1)), ValueError, "shape"),
    "h int tensor": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), h=torch.ones(2, dtype=torch.int64)), TypeError,
                     "floating-point tensor"),
    "h str": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), h="0.1"), TypeError, "h must be a number or a tensor"),
    "h bool": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), h=True), TypeError, "h must be a number or a tensor"),
    "h None": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), h=None), TypeError, "h must be a number or a tensor"),
    "on": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), on="softmax"), ValueError, "unknown on 'softmax'"),
    "reduction": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), reduction="avg"), ValueError,
                  "unknown reduction 'avg'"),
    "backend": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), backend="gpu"), ValueError, "unknown backend 'gpu'"),
    "temperature=0": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), on="probs", temperature=0.0), ValueError,
                      "temperature must be"),
    "temperature<0": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), on="probs", temperature=-1), ValueError,
                      "temperature must be"),
    "temperature=nan": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), temperature=math.nan), ValueError,
                        "temperature must be"),
    "temperature str": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), temperature="1"), ValueError,
                        "temperature must be"),
    "temperature=1e-39": (dict(s_clean=_t(2, 3), s_pert=_t(2, 3), on="probs", temperature=1e-39), ValueError,
                          "temperature = 1e-39 is outside the range of torch.float32"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(case):
    kwargs, error, message = BAD_INPUTS[case]
    kwargs = {"h": 0.1, **kwargs}
    with pytest.raises(error, match=message):
        rkd_fast.fd_jacobian_loss(kwargs.pop("s_clean"), kwargs.pop("s_pert"), kwargs.pop("h"), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without a GPU gives")
def test_cuda_backend_on_cpu_tensors():
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: .*takes CUDA tensors, got cpu"):
        rkd_fast.fd_jacobian_loss(_t(2, 3), _t(2, 3), 0.1, backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without a GPU gives")
def test_triton_backend_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable: .*(TRITON_INTERPRET|not installed)"):
        rkd_fast.fd_jacobian_loss(_t(2, 3), _t(2, 3), 0.1, backend="triton")
