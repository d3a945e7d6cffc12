"""The Triton kernel of fd_jacobian_loss against the pure PyTorch reference (evaluated in float64 on the same
values): forward, gradients (s_clean, s_pert, a tensor h), dtypes, odd shapes, strided rows, gradcheck, opcheck
and torch.compile. On CPU it runs under TRITON_INTERPRET=1 (see conftest.py), where the kernel's block is 64
elements, so K > 64 walks the block loops."""

import pytest
import torch

import rkd_fast
from rkd_fast.ops._reference import fd_jacobian as reference
from rkd_fast.ops.fd_jacobian import options

ON = ("logits", "probs")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# (loss, gradient) tolerance relative to the largest expected magnitude. Differences are taken in fp32 (fp64)
# from the input values, so losses are fp32-exact whatever the input dtype; gradients are rounded to it.
TOLERANCE = {torch.float32: (5e-5, 1e-4), torch.float64: (1e-10, 1e-10), torch.float16: (5e-5, 2e-3),
             torch.bfloat16: (5e-5, 1.6e-2)}


def make_pair(n, k, dtype, device, requires_grad=True, step=0.05):
    clean = 2 * torch.randn(n, k, dtype=torch.float64)
    pert = clean + step * torch.randn(n, k, dtype=torch.float64)
    return tuple(x.to(dtype).to(device).requires_grad_(requires_grad) for x in (clean, pert))


def assert_close_scaled(actual, expected, tol, what):
    scale = expected.abs().max().item() if expected.numel() else 0.0
    floor = 1e-12 if actual.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), rtol=tol, atol=tol * scale + floor,
                               check_dtype=False, equal_nan=True, msg=lambda m: f"{what}: {m}")


def check(n, k, dtype, device, *, on, teacher, h_tensor, reduction="none", temperature=1.5):
    s_clean, s_pert = make_pair(n, k, dtype, device)
    t_clean, t_pert = make_pair(n, k, dtype, device, requires_grad=False) if teacher else (None, None)
    h = (0.03 + 0.04 * torch.rand(n, device=device)).requires_grad_() if h_tensor else 0.05
    loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, h, t_clean=t_clean, t_pert=t_pert, on=on,
                                     temperature=temperature, reduction=reduction, backend="triton")

    def f64(x):
        return None if x is None else x.detach().double().requires_grad_(x.requires_grad)

    s64, p64, h64 = f64(s_clean), f64(s_pert), f64(h) if h_tensor else h
    expected = reference(s64, p64, h64, f64(t_clean), f64(t_pert), on=on, temperature=temperature,
                         reduction=reduction)
    loss_tol, grad_tol = TOLERANCE[dtype]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == expected.shape
    assert_close_scaled(loss, expected, loss_tol, "loss")

    inputs = [s_clean, s_pert] + ([h] if h_tensor else [])
    weight = torch.rand(expected.shape, dtype=torch.float64, device=device) + 0.5
    grads = torch.autograd.grad(loss, inputs, weight.to(loss.dtype))
    expected_grads = torch.autograd.grad(expected, [s64, p64] + ([h64] if h_tensor else []), weight)
    for name, x, g, g64 in zip(("s_clean", "s_pert", "h"), inputs, grads, expected_grads):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_close_scaled(g, g64, grad_tol if name != "h" else TOLERANCE[torch.float32][0], name)


@pytest.mark.parametrize("h_tensor", (False, True), ids=("h_float", "h_tensor"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("teacher", (False, True), ids=("penalty", "matching"))
@pytest.mark.parametrize("on", ON)
def test_matches_reference(device, on, teacher, dtype, h_tensor):
    check(5, 10, dtype, device, on=on, teacher=teacher, h_tensor=h_tensor)


@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("on", ON)
def test_reductions(device, on, reduction):
    check(4, 9, torch.float32, device, on=on, teacher=True, h_tensor=True, reduction=reduction)


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 7), (2, 1000), (9, 65), (0, 10), (3, 0)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("on", ON)
def test_odd_shapes(device, on, shape):
    check(*shape, torch.float32, device, on=on, teacher=True, h_tensor=True)


def test_zero_dim_step_gets_its_gradient(device):
    # A 0-d h that requires grad: one step for every row, its gradient summed over the rows' weighted parts.
    s_clean, s_pert = make_pair(4, 9, torch.float32, device)
    h = torch.tensor(0.04, device=device, requires_grad=True)
    weight = torch.rand(4, device=device) + 0.5
    loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, h, on="probs", reduction="none", backend="triton")
    (grad,) = torch.autograd.grad(loss, h, weight)
    h64 = h.detach().double().requires_grad_()
    expected = reference(s_clean.detach().double(), s_pert.detach().double(), h64, on="probs", reduction="none")
    (expected_grad,) = torch.autograd.grad(expected, h64, weight.double())
    assert_close_scaled(grad, expected_grad, TOLERANCE[torch.float32][0], "h")


def test_large_step(device):
    # float64 holds h = 1e150 and the loss it gives (~1e-300 per element); float32 inputs are computed in float32,
    # where h = 1e300 would be inf and the loss silently 0: refused.
    s_clean, s_pert = make_pair(3, 6, torch.float64, device, requires_grad=False)
    losses = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 1e150, reduction="none", backend="triton")
    expected = (((s_pert - s_clean) * 1e-75) ** 2).sum(dim=1) * 1e-150  # ‖d‖² / h², scaled to stay in range
    assert (losses > 0).all()
    torch.testing.assert_close(losses, expected, rtol=8 * torch.finfo(torch.float64).eps, atol=0)
    with pytest.raises(ValueError, match="outside the range of torch.float32"):
        rkd_fast.fd_jacobian_loss(s_clean.float(), s_pert.float(), 1e300, backend="triton")


@pytest.mark.parametrize("on", ON)
def test_large_logits(device, on):
    # The softmax subtracts the row max: logits of 1e4 would overflow exp() otherwise.
    s_clean, s_pert = make_pair(3, 20, torch.float32, device, requires_grad=False)
    s_clean, s_pert = s_clean + 1e4, s_pert + 1e4
    loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.05, on=on, reduction="none", backend="triton")
    expected = reference(s_clean.double(), s_pert.double(), 0.05, on=on, reduction="none")
    assert torch.isfinite(loss).all()
    assert_close_scaled(loss, expected, 1e-3, "loss")  # 1e4 in fp32 keeps ~3 digits of the differences


def test_strided_rows(device):
    # Rows of a wider tensor (unit-stride, read in place) and column-major inputs (copied first).
    wide = torch.randn(4, 30, device=device)
    s_clean, s_pert = wide[:, :12].requires_grad_(), wide[:, 15:27].clone().requires_grad_()
    t_clean, t_pert = torch.randn(12, 4, device=device).t(), torch.randn(12, 4, device=device).t()
    for on in ON:
        loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.1, t_clean=t_clean, t_pert=t_pert, on=on,
                                         reduction="none", backend="triton")
        expected = reference(s_clean.double(), s_pert.double(), 0.1, t_clean.double(), t_pert.double(), on=on,
                             reduction="none")
        assert_close_scaled(loss, expected, 5e-5, on)


def test_teacher_gets_no_gradient(device):
    s_clean, s_pert = make_pair(3, 6, torch.float32, device)
    t_clean, t_pert = make_pair(3, 6, torch.float32, device)
    rkd_fast.fd_jacobian_loss(s_clean, s_pert, 0.1, t_clean=t_clean, t_pert=t_pert, on="probs",
                              backend="triton").backward()
    assert t_clean.grad is None and t_pert.grad is None and s_clean.grad is not None


@pytest.mark.parametrize("teacher", (False, True), ids=("penalty", "matching"))
@pytest.mark.parametrize("on", ON)
def test_gradcheck(device, on, teacher):
    s_clean, s_pert = make_pair(3, 5, torch.float64, device, step=0.2)
    t_clean, t_pert = make_pair(3, 5, torch.float64, device, requires_grad=False, step=0.2) if teacher \
        else (None, None)
    h = (0.1 + 0.1 * torch.rand(3, dtype=torch.float64, device=device)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, step: rkd_fast.fd_jacobian_loss(a, b, step, t_clean=t_clean, t_pert=t_pert, on=on,
                                                     temperature=1.5, reduction="none", backend="triton"),
        (s_clean, s_pert, h))


@pytest.mark.parametrize("case", ("logits-penalty", "probs-matching-bf16", "probs-pert-only"))
def test_opcheck(device, case):
    dtype = torch.bfloat16 if case.endswith("bf16") else torch.float32
    s_clean, s_pert = make_pair(3, 7, dtype, device)
    t_clean, t_pert = make_pair(3, 7, dtype, device, requires_grad=False) if "matching" in case else (None, None)
    h = (0.03 + 0.04 * torch.rand(3, device=device)).requires_grad_()  # its gradient: reduction "none" only
    on = case.split("-")[0]
    grad_clean = case != "probs-pert-only"
    if not grad_clean:
        s_clean = s_clean.detach()
    torch.library.opcheck(torch.ops.rkd_fast.fd_jacobian_fwd_triton,
                          (s_clean, s_pert, h, t_clean, t_pert, 2.0, options(on, "none", grad_clean, True)))
    torch.library.opcheck(torch.ops.rkd_fast.fd_jacobian_fwd_triton,
                          (s_clean, s_pert, h.detach(), t_clean, t_pert, 2.0, options(on, "mean", grad_clean, True)))


@pytest.mark.parametrize("on", ON)
def test_compile_fullgraph(device, on):
    def step(s_clean, s_pert, h, t_clean, t_pert):
        return rkd_fast.fd_jacobian_loss(s_clean, s_pert, h, t_clean=t_clean, t_pert=t_pert, on=on,
                                         reduction="sum", backend="triton") * 0.5

    torch._dynamo.reset()
    s_clean, s_pert = make_pair(4, 9, torch.float32, device)
    t_clean, t_pert = make_pair(4, 9, torch.float32, device, requires_grad=False)
    h = 0.03 + 0.04 * torch.rand(4, device=device)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(s_clean, s_pert, h, t_clean, t_pert)
    grads = torch.autograd.grad(loss, (s_clean, s_pert))
    eager_loss = step(s_clean, s_pert, h, t_clean, t_pert)
    eager_grads = torch.autograd.grad(eager_loss, (s_clean, s_pert))
    torch.testing.assert_close(loss, eager_loss)
    for g, eg in zip(grads, eager_grads):
        torch.testing.assert_close(g, eg)
    torch._dynamo.reset()
