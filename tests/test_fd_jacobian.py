"""rkd_fast.fd_jacobian_loss on every backend, each on its device (the targets of tests/_op_backends.py: reference
and cpu on CPU tensors, cuda and triton on a GPU), against the oracle: the reference evaluated in float64 on the
same input values (tests/_fd_jacobian_checks.py). A target that cannot run here skips with the reason: the cpu one
while the C++ kernel is not built, the GPU ones without a GPU (those are marked `gpu`). The Triton kernel on CPU
tensors runs these same tests under the interpreter, in tests/triton.

The shapes cover one warp / one block per row with K below and above the warp width and the Triton block (4096
on a GPU, 64 under the interpreter), several rows per CUDA block with a partial last block, and empty batches and
rows. The GPU targets have not run since the kernel took the reduction inside (no GPU was available)."""

import math

import pytest
import torch
from _fd_jacobian_checks import (DTYPES, LOSS_TOL, ON, REDUCTIONS, check_op, kernel, make_h, make_pair, oracle,
                                 reference)
from _op_backends import (COPY_OPS, assert_close_scaled, needs_cpu_kernel, ops_run, skip_large_under_interpreter,
                          target_fixtures)

import rkd_fast
from rkd_fast.ops.fd_jacobian import options

pytestmark = pytest.mark.cross_path  # `make test` runs it again on ATen's portable kernels

target, kernel_target, cxx_kernel_target, gpu_target = target_fixtures(
    "fd_jacobian", "target", "kernel_target", "cxx_kernel_target", "gpu_target")
needs_cpu = needs_cpu_kernel("fd_jacobian")


def _student_and_teacher(target, shape, dtype, with_teacher):
    """s_clean, s_pert (requiring grad) of `shape` on the target's device, and a teacher pair or None."""
    skip_large_under_interpreter("fd_jacobian", target, shape, shape)
    n, k = shape
    device = target[1]
    s_clean, s_pert = make_pair(n, k, dtype, device)
    return s_clean, s_pert, make_pair(n, k, dtype, device, requires_grad=False) if with_teacher else None


@pytest.mark.parametrize("shape", [(6, 10), (37, 100)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("h_kind", ("float", "tensor", "0-d tensor"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_teacher", (False, True), ids=("penalty", "matching"))
@pytest.mark.parametrize("on", ON)
def test_matches_reference(target, on, with_teacher, reduction, dtype, h_kind, shape):
    backend, device = target
    s_clean, s_pert, teacher = _student_and_teacher(target, shape, dtype, with_teacher)
    check_op(s_clean, s_pert, make_h(h_kind, shape[0], device, requires_grad=True), teacher=teacher, on=on,
             temperature=2.0, reduction=reduction, backend=backend)


ODD_SHAPES = [(1, 1), (1, 7), (5, 1), (3, 31), (3, 33), (9, 65), (33, 17), (2, 1000), (3, 1000), (7, 1000),
              (2, 4097), (1029, 10), (0, 10), (4, 0)]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("with_teacher", (False, True), ids=("penalty", "matching"))
@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_odd_shapes(target, shape, on, with_teacher, dtype):
    backend, device = target
    s_clean, s_pert, teacher = _student_and_teacher(target, shape, dtype, with_teacher)
    for reduction in ("none", "sum"):
        check_op(s_clean, s_pert, make_h("tensor", shape[0], device), teacher=teacher, on=on, reduction=reduction,
                 backend=backend)


def test_mean_of_empty_batch_is_nan(target):
    backend, device = target
    s_clean, s_pert = make_pair(0, 10, device=device)
    loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.1, backend=backend)
    assert torch.isnan(loss)


@pytest.mark.parametrize("on", ON)
def test_linear_model_gives_exact_directional_derivative(target, on):
    # An independent check of the definition (not of one implementation against another): for a linear model
    # s = x W the finite difference is exact, (s(x + h·d) - s(x))/h = d W, so on="logits" gives ‖d W‖²
    # and, with a teacher V, ‖d W - d V‖²; on="probs" gives ‖J_softmax(d W)‖² only as h → 0, so it is
    # compared with torch.func.jvp at a small step.
    backend, device = target
    torch.manual_seed(1)
    x, d = torch.randn(4, 6, dtype=torch.float64).to(device), torch.randn(4, 6, dtype=torch.float64).to(device)
    w, v = torch.randn(6, 5, dtype=torch.float64).to(device), torch.randn(6, 5, dtype=torch.float64).to(device)
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


def test_temperature_only_changes_probs(target):
    backend, device = target
    s_clean, s_pert = make_pair(3, 8, device=device, requires_grad=False)
    logits = [rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.1, on="logits", temperature=t, backend=backend)
              for t in (1.0, 4.0)]
    probs = [rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.1, on="probs", temperature=t, backend=backend)
             for t in (1.0, 4.0)]
    torch.testing.assert_close(logits[0], logits[1])
    assert not torch.allclose(probs[0], probs[1])
    assert_close_scaled(probs[1], oracle(s_clean, s_pert, 0.1, on="probs", temperature=4.0), LOSS_TOL[torch.float32])


@pytest.mark.parametrize("on", ON)
def test_large_logits_softmax_stays_finite(target, on):
    # Max-subtraction in the softmax: logits of 1e4 would overflow exp() without it.
    backend, device = target
    s_clean, s_pert = make_pair(3, 20, device=device, requires_grad=True)
    with torch.no_grad():
        s_clean.add_(1e4)
        s_pert.add_(1e4)
    loss = check_op(s_clean, s_pert, 0.05, on=on, temperature=0.5, reduction="none", backend=backend)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("layout", ("row_slice", "transposed", "column_slice"))
@pytest.mark.parametrize("on", ON)
def test_strided_inputs(target, on, layout):
    # row_slice (rows of a wider tensor, unit-stride) is read in place; the others are copied to contiguous.
    backend, device = target

    def view(x):
        if layout == "row_slice":
            return torch.cat([x, torch.randn(x.shape[0], 3).to(device)], dim=1)[:, :x.shape[1]]
        if layout == "transposed":
            return x.t().contiguous().t()
        return torch.stack([x, torch.randn_like(x)], dim=2)[:, :, 0]

    s_clean, s_pert = (view(x).requires_grad_() for x in make_pair(5, 9, device=device, requires_grad=False))
    t_clean, t_pert = (view(x) for x in make_pair(5, 9, device=device, requires_grad=False))
    assert not s_clean.is_contiguous()
    check_op(s_clean, s_pert, make_h("tensor", 5, device), teacher=(t_clean, t_pert), on=on, reduction="none",
             backend=backend)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("needs", ("clean", "pert", "neither"))
@pytest.mark.parametrize("on", ON)
def test_only_one_input_requires_grad(target, on, needs, dtype):
    backend, device = target
    s_clean, s_pert = make_pair(4, 7, dtype, device, requires_grad=False)
    s_clean.requires_grad_(needs == "clean")
    s_pert.requires_grad_(needs == "pert")
    check_op(s_clean, s_pert, 0.05, teacher=make_pair(4, 7, dtype, device, requires_grad=False), on=on,
             reduction="sum", backend=backend)


@pytest.mark.parametrize("on", ON)
def test_teacher_gets_no_gradient(target, on):
    backend, device = target
    s_clean, s_pert = make_pair(4, 7, device=device)
    t_clean, t_pert = make_pair(4, 7, device=device, requires_grad=True)  # requires grad, yet is a constant target
    loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.05, t_clean=t_clean, t_pert=t_pert, on=on,
                                     backend=backend)
    loss.backward()
    assert t_clean.grad is None and t_pert.grad is None
    assert s_clean.grad is not None and s_pert.grad is not None


def test_logits_gradients_are_opposite(target):
    backend, device = target
    s_clean, s_pert = make_pair(4, 7, device=device)
    grads = torch.autograd.grad(rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.05, backend=backend),
                                (s_clean, s_pert))
    torch.testing.assert_close(grads[0], -grads[1])


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64)], ids=str)
def test_mixed_dtypes_are_promoted(target, dtypes):
    backend, device = target
    student_dtype, teacher_dtype = dtypes
    s_clean, s_pert = make_pair(3, 6, student_dtype, device)
    t_clean, t_pert = make_pair(3, 6, teacher_dtype, device, requires_grad=False)
    loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.05, t_clean=t_clean, t_pert=t_pert, on="probs",
                                     backend=backend)
    common = torch.promote_types(student_dtype, teacher_dtype)
    assert loss.dtype == (torch.float64 if common == torch.float64 else torch.float32)
    expected = reference(s_clean.double(), s_pert.double(), 0.05, t_clean.double(), t_pert.double(), on="probs")
    assert_close_scaled(loss, expected, LOSS_TOL[torch.float32])
    grads = torch.autograd.grad(loss, (s_clean, s_pert))
    assert all(g.dtype == student_dtype for g in grads)


def test_no_grad_mode(target):
    backend, device = target
    s_clean, s_pert = make_pair(3, 6, device=device)
    with torch.no_grad():
        loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.05, on="probs", backend=backend)
    assert not loss.requires_grad


def test_nan_input_propagates(target):
    backend, device = target
    s_clean, s_pert = make_pair(3, 6, device=device, requires_grad=False)
    s_pert[1, 2] = math.nan
    for on in ON:
        losses = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.05, on=on, reduction="none", backend=backend)
        assert torch.isnan(losses[1]) and torch.isfinite(losses[[0, 2]]).all()


def test_cuda_h_is_not_checked(gpu_target):
    # Documented: reading a CUDA h back would synchronise, so a zero step is not refused; it gives inf/nan.
    backend, device = gpu_target
    s_clean, s_pert = make_pair(3, 5, device=device, requires_grad=False)
    h = torch.tensor([0.1, 0.0, 0.1], device=device)
    losses = rkd_fast.fd_jacobian_loss(s_clean, s_pert, h, reduction="none", backend=backend)
    assert torch.isfinite(losses[[0, 2]]).all() and not torch.isfinite(losses[1])


# --- the fused backward: the gradients come from the forward ---------------------------------------------------

@needs_cpu
def test_backward_of_an_unweighted_loss_costs_nothing():
    # For an upstream gradient of one the backward hands on the gradients the forward wrote: no op runs.
    s_clean, s_pert = make_pair(4, 7)
    loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.05, backend="cpu")
    names = ops_run(lambda: torch.autograd.grad(loss, (s_clean, s_pert), retain_graph=True))
    assert not names & ({"aten::mul"} | COPY_OPS), sorted(names)
    assert "aten::mul" in ops_run(lambda: torch.autograd.grad(loss * 0.5, (s_clean, s_pert)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_twice(target, reduction):
    # retain_graph: each backward scales the forward's gradients afresh, and a change to .grad in between (which
    # may share memory with what the first backward returned) does not reach the second.
    backend, device = target
    s_clean, s_pert = make_pair(4, 7, device=device)
    h = make_h("tensor", 4, device, requires_grad=True)
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

def test_large_step_in_float64(target):
    # float64 holds h = 1e150 and the loss it gives, ~1e-300 per element: no silent 0.
    backend, device = target
    s_clean, s_pert = make_pair(3, 6, torch.float64, device, requires_grad=False)
    losses = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 1e150, reduction="none", backend=backend)
    expected = (((s_pert - s_clean) * 1e-75) ** 2).sum(dim=1) * 1e-150  # ‖d‖² / h², scaled to stay in range
    assert (losses > 0).all()
    torch.testing.assert_close(losses, expected, rtol=8 * torch.finfo(torch.float64).eps, atol=0)


@pytest.mark.parametrize("h", (1e300, 1e-40, torch.tensor([0.1, 1e300], dtype=torch.float64)),
                         ids=("1e300", "1e-40", "float64 tensor"))
def test_step_outside_the_accumulation_range_is_refused(target, h):
    # float32 inputs are computed in float32, where h = 1e300 is inf (the loss silently 0) and 1/1e-40 is inf.
    backend, device = target
    if isinstance(h, torch.Tensor) and device == "cuda":
        pytest.skip("a CUDA h is not read back (test_cuda_h_is_not_checked)")
    s_clean, s_pert = make_pair(2, 5, device=device)
    with pytest.raises(ValueError, match="outside the range of torch.float32"):
        rkd_fast.fd_jacobian_loss(s_clean, s_pert, h, backend=backend)


# --- gradcheck, opcheck, torch.compile ---------------------------------------------------------------------

@pytest.mark.parametrize("with_teacher", (False, True), ids=("penalty", "matching"))
@pytest.mark.parametrize("on", ON)
def test_gradcheck(target, on, with_teacher):
    backend, device = target
    k = 40 if device == "cuda" else 5  # on a GPU above the warp width; small where each evaluation costs more
    s_clean, s_pert = make_pair(3, k, torch.float64, device, step=0.2)
    teacher = make_pair(3, k, torch.float64, device, step=0.2, requires_grad=False) if with_teacher \
        else (None, None)
    h = make_h("tensor", 3, device).double().requires_grad_()
    for reduction in ("none", "mean"):
        assert torch.autograd.gradcheck(
            lambda a, b, step: rkd_fast.fd_jacobian_loss(a, b, step, t_clean=teacher[0], t_pert=teacher[1], on=on,
                                                         temperature=1.5, reduction=reduction, backend=backend),
            (s_clean, s_pert, h))


# (s_clean and s_pert, t_clean and t_pert as (n, k, dtype, requires_grad, teacher?), h, on, temperature,
# reduction); h gets a gradient from reduction "none" only (fd_jacobian_loss reduces those itself)
OPCHECK_SAMPLES = [
    ((4, 10, torch.float32, True, False), "tensor", "logits", 1.0, "mean"),
    ((4, 10, torch.float32, True, True), "tensor with grad", "probs", 2.0, "none"),
    ((3, 7, torch.bfloat16, True, True), "tensor", "probs", 1.0, "sum"),
    ((3, 7, torch.float16, True, False), "0-d tensor", "logits", 1.0, "mean"),
    ((2, 5, torch.float64, True, True), "float64 tensor with grad", "logits", 1.0, "none"),
    # K = 33: a partial warp after a full one
    *[((6, 33, dtype, True, True), h, on, 2.0, reduction) for on in ON for dtype in (torch.float32, torch.bfloat16)
      for h, reduction in (("tensor with grad", "none"), ("tensor", "mean"))],
    # a penalty, a bfloat16 matching, and one with the gradient of s_pert only
    *[((3, 7, dtype, grads, teacher), h, on, 2.0, reduction)
      for dtype, grads, on, teacher in ((torch.float32, True, "logits", False), (torch.bfloat16, True, "probs", True),
                                        (torch.float32, "pert", "probs", False))
      for h, reduction in (("tensor with grad", "none"), ("tensor", "mean"))],
]


def _opcheck_h(kind, n, device):
    if kind == "0-d tensor":
        return torch.tensor(0.05, device=device)
    dtype = torch.float64 if kind.startswith("float64") else torch.float32
    return (0.03 + 0.04 * torch.rand(n, dtype=dtype, device=device)).requires_grad_(kind.endswith("with grad"))


@pytest.mark.parametrize("index", range(len(OPCHECK_SAMPLES)))
def test_opcheck(kernel_target, index):
    backend, device = kernel_target
    (n, k, dtype, grads, with_teacher), h_kind, on, temperature, reduction = OPCHECK_SAMPLES[index]
    s_clean, s_pert = make_pair(n, k, dtype, device)
    if grads == "pert":
        s_clean = s_clean.detach()
    t_clean, t_pert = make_pair(n, k, dtype, device, requires_grad=False) if with_teacher else (None, None)
    torch.library.opcheck(kernel(backend), (s_clean, s_pert, _opcheck_h(h_kind, n, device), t_clean, t_pert,
                                            temperature,
                                            options(on, reduction, s_clean.requires_grad, s_pert.requires_grad)))


def check_compiled(backend, device, on, h_kind, with_teacher, compiler, dynamic=None):
    """The op under torch.compile(fullgraph=True): the same loss and gradients as eager."""
    def step(s_clean, s_pert, h, t_clean, t_pert):
        return rkd_fast.fd_jacobian_loss(s_clean, s_pert, h, t_clean=t_clean, t_pert=t_pert, on=on,
                                         reduction="sum", backend=backend) * 0.5

    torch._dynamo.reset()
    s_clean, s_pert = make_pair(4, 9, device=device)
    t_clean, t_pert = make_pair(4, 9, device=device, requires_grad=False) if with_teacher else (None, None)
    h = make_h(h_kind, 4, device)
    compiled = torch.compile(step, fullgraph=True, backend=compiler, dynamic=dynamic)
    loss = compiled(s_clean, s_pert, h, t_clean, t_pert)
    grads = torch.autograd.grad(loss, (s_clean, s_pert))
    eager_loss = step(s_clean, s_pert, h, t_clean, t_pert)
    eager_grads = torch.autograd.grad(eager_loss, (s_clean, s_pert))
    torch.testing.assert_close(loss, eager_loss)
    for g, eg in zip(grads, eager_grads):
        torch.testing.assert_close(g, eg)
    torch._dynamo.reset()


@pytest.mark.parametrize("h_kind", ("float", "tensor"))
@pytest.mark.parametrize("on", ON)
def test_compile_fullgraph(target, on, h_kind):
    # aot_eager runs the same graph capture (Dynamo + AOTAutograd, the fake kernel, the autograd formula) as
    # inductor without its C++ code generation, which takes minutes on 2 cores.
    backend, device = target
    check_compiled(backend, device, on, h_kind, True, "aot_eager")


@pytest.mark.parametrize("on", ON)
def test_compile_fullgraph_dynamic_with_a_float_step(target, on):
    # dynamic=True makes a float h (and the temperature) symbolic: the argument checks must be traceable.
    backend, device = target
    check_compiled(backend, device, on, "float", True, "aot_eager", dynamic=True)


def test_compile_inductor_on_gpu(gpu_target):
    backend, device = gpu_target
    check_compiled(backend, device, "probs", "tensor", False, "inductor")


# --- the kernel path --------------------------------------------------------------------------------------------

@needs_cpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_kernel_reads_in_place(dtype):
    s_clean, s_pert = make_pair(4, 12, dtype)
    wide = torch.randn(4, 20).to(dtype)
    t_clean, t_pert = wide[:, :12], wide[:, 8:]  # unit-stride rows of a wider tensor
    names = ops_run(lambda: rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.1, t_clean=t_clean, t_pert=t_pert,
                                                      on="probs", reduction="none", backend="cpu"))
    assert "rkd_fast::fd_jacobian_fwd" in names  # the kernel did run under the profiler
    assert not names & COPY_OPS, f"copies before or inside the kernel: {sorted(names & COPY_OPS)}"


@needs_cpu
def test_copy_probe_sees_copies():
    # The probe above must be able to fail: column-major inputs are documented to be copied to contiguous.
    s_clean, s_pert = (x.t().contiguous().t() for x in make_pair(4, 12, requires_grad=False))
    names = ops_run(lambda: rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.1, reduction="none", backend="cpu"))
    assert "rkd_fast::fd_jacobian_fwd" in names and names & COPY_OPS


@needs_cpu
def test_auto_uses_the_cpu_kernel():
    s_clean, s_pert = make_pair(2, 5)
    names = ops_run(lambda: rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.1))
    assert "rkd_fast::fd_jacobian_fwd" in names


# --- bad input -----------------------------------------------------------------------------------------------

def test_kernel_refuses_bad_arguments(cxx_kernel_target):
    # The op called directly, past the Python checks: the C++ checks (csrc/input_checks.cpp, one definition for
    # the CPU and CUDA kernels) name the problem, with the Python API's exception types.
    backend, device = cxx_kernel_target
    op = kernel(backend)
    s, p = make_pair(3, 5, device=device, requires_grad=False)
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
