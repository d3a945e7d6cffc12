"""rkd_fast.fd_jacobian_loss on a CUDA GPU: the "cuda" backend (csrc/cuda/fd_jacobian_cuda.cu) and the "triton"
backend (rkd_fast/ops/triton/fd_jacobian.py), against the oracle: the reference evaluated in float64 on the
same input values, with autograd for the gradients. Skips without a GPU; a backend that is unavailable on the
GPU machine (extension built without CUDA, triton missing) skips with the reason rkd_fast.backends() gives.

The shapes cover one warp / one block per row with K below and above the warp width and the Triton block
(4096), several rows per CUDA block with a partial last block, and empty batches and rows."""

import pytest
import torch
from _op_backends import GPU_MODULE_MARKS, gpu_backend_params

import rkd_fast
from rkd_fast.ops._reference import fd_jacobian as reference
from rkd_fast.ops.fd_jacobian import options

pytestmark = GPU_MODULE_MARKS
STATUS, BACKENDS = gpu_backend_params("fd_jacobian")
OPS = {"cuda": "fd_jacobian_fwd", "triton": "fd_jacobian_fwd_triton"}
ON = ("logits", "probs")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# (loss, gradient) tolerance relative to the largest expected magnitude. Differences are taken in fp32 (fp64)
# from the input values, so losses are fp32-exact whatever the input dtype; gradients are rounded to it.
TOL = {torch.float32: (5e-5, 1e-4), torch.float64: (1e-10, 1e-10), torch.float16: (5e-5, 2e-3),
       torch.bfloat16: (5e-5, 1.6e-2)}


def make_pair(n, k, dtype, requires_grad=True, step=0.05):
    clean = 2 * torch.randn(n, k, dtype=torch.float64, device="cuda")
    pert = clean + step * torch.randn(n, k, dtype=torch.float64, device="cuda")
    return tuple(x.to(dtype).requires_grad_(requires_grad) for x in (clean, pert))


def assert_close_scaled(actual, expected, tol, what):
    expected = expected.detach().double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    floor = 1e-12 if actual.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(actual.detach().double(), expected, rtol=tol, atol=tol * scale + floor,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def compare(backend, s_clean, s_pert, h, teacher=(None, None), on="logits", temperature=1.5, reduction="none"):
    """The public function with `backend` against the oracle: the loss, and the gradients (s_clean, s_pert, a
    tensor h) of a randomly weighted sum of the per-sample losses."""
    dtype = s_clean.dtype
    loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, h, t_clean=teacher[0], t_pert=teacher[1], on=on,
                                     temperature=temperature, reduction=reduction, backend=backend)

    def f64(x):
        return x if not isinstance(x, torch.Tensor) else x.detach().double().requires_grad_(x.requires_grad)

    args = (f64(s_clean), f64(s_pert), f64(h), f64(teacher[0]), f64(teacher[1]))
    expected = reference(*args, on=on, temperature=temperature, reduction=reduction)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == expected.shape
    loss_tol, grad_tol = TOL[dtype]
    assert_close_scaled(loss, expected, loss_tol, f"{backend} {on} loss")

    inputs = [x for x in (s_clean, s_pert, h) if isinstance(x, torch.Tensor) and x.requires_grad]
    inputs64 = [x for x in args[:3] if isinstance(x, torch.Tensor) and x.requires_grad]
    weight = torch.rand(loss.shape, device="cuda", dtype=torch.float64) + 0.5
    grads = torch.autograd.grad(loss, inputs, weight.to(loss.dtype))
    expected_grads = torch.autograd.grad(expected, inputs64, weight)
    for x, g, g64 in zip(inputs, grads, expected_grads):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_close_scaled(g, g64, grad_tol if x is not h else TOL[torch.float32][0], f"{backend} {on} grad")


@pytest.mark.parametrize("h_tensor", (False, True), ids=("h_float", "h_tensor"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("teacher", (False, True), ids=("penalty", "matching"))
@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, on, teacher, dtype, h_tensor):
    n, k = 37, 100
    s_clean, s_pert = make_pair(n, k, dtype)
    t = make_pair(n, k, dtype, requires_grad=False) if teacher else (None, None)
    h = (0.03 + 0.04 * torch.rand(n, device="cuda")).requires_grad_() if h_tensor else 0.05
    compare(backend, s_clean, s_pert, h, t, on=on)


@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (3, 31), (3, 33), (7, 1000), (2, 4097), (1029, 10),
                                   (0, 10), (6, 0)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes(backend, on, shape):
    n, k = shape
    s_clean, s_pert = make_pair(n, k, torch.float32)
    compare(backend, s_clean, s_pert, 0.03 + 0.04 * torch.rand(n, device="cuda"),
            make_pair(n, k, torch.float32, requires_grad=False), on=on)


@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions(backend, reduction):
    s_clean, s_pert = make_pair(64, 10, torch.float32)
    compare(backend, s_clean, s_pert, 0.05, on="probs", reduction=reduction)


@pytest.mark.parametrize("needs", ("clean", "pert"))
@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_student_input_requires_grad(backend, on, needs):
    s_clean, s_pert = make_pair(9, 20, torch.bfloat16, requires_grad=False)
    (s_clean if needs == "clean" else s_pert).requires_grad_()
    compare(backend, s_clean, s_pert, 0.05, make_pair(9, 20, torch.bfloat16, requires_grad=False), on=on)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows(backend):
    # Unit-stride rows of a wider tensor are read in place; column-major inputs are copied first.
    wide = torch.randn(8, 50, device="cuda")
    s_clean, s_pert = wide[:, :20].requires_grad_(), (wide[:, 25:45] + 0.01).detach().requires_grad_()
    t_clean = torch.randn(20, 8, device="cuda").t()
    t_pert = (t_clean + 0.01 * torch.randn(8, 20, device="cuda"))
    for on in ON:
        compare(backend, s_clean, s_pert, 0.05, (t_clean, t_pert), on=on)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits(backend):
    # The softmax subtracts the row max: logits of 1e4 would overflow exp() otherwise.
    s_clean, s_pert = make_pair(5, 40, torch.float32, requires_grad=False)
    loss = rkd_fast.fd_jacobian_loss(s_clean + 1e4, s_pert + 1e4, 0.05, on="probs", temperature=0.5,
                                     reduction="none", backend=backend)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_h_is_not_checked(backend):
    # Documented: reading a CUDA h back would synchronise, so a zero step is not refused; it gives inf/nan.
    s_clean, s_pert = make_pair(3, 5, torch.float32, requires_grad=False)
    h = torch.tensor([0.1, 0.0, 0.1], device="cuda")
    losses = rkd_fast.fd_jacobian_loss(s_clean, s_pert, h, reduction="none", backend=backend)
    assert torch.isfinite(losses[[0, 2]]).all() and not torch.isfinite(losses[1])


@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend, on):
    s_clean, s_pert = make_pair(3, 40, torch.float64, step=0.2)
    t_clean, t_pert = make_pair(3, 40, torch.float64, requires_grad=False, step=0.2)
    h = (0.1 + 0.1 * torch.rand(3, dtype=torch.float64, device="cuda")).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, step: rkd_fast.fd_jacobian_loss(a, b, step, t_clean=t_clean, t_pert=t_pert, on=on,
                                                     reduction="none", backend=backend), (s_clean, s_pert, h))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("on", ON)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, on, dtype):
    s_clean, s_pert = make_pair(6, 33, dtype)
    t_clean, t_pert = make_pair(6, 33, dtype, requires_grad=False)
    h = (0.03 + 0.04 * torch.rand(6, device="cuda")).requires_grad_()  # its gradient: reduction "none" only
    op = getattr(torch.ops.rkd_fast, OPS[backend])
    torch.library.opcheck(op, (s_clean, s_pert, h, t_clean, t_pert, 2.0, options(on, "none", True, True)))
    torch.library.opcheck(op, (s_clean, s_pert, h.detach(), t_clean, t_pert, 2.0, options(on, "mean", True, True)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    def step(s_clean, s_pert, h):
        return rkd_fast.fd_jacobian_loss(s_clean, s_pert, h, on="probs", reduction="sum", backend=backend) * 0.5

    torch._dynamo.reset()
    s_clean, s_pert = make_pair(8, 10, torch.float32)
    h = 0.03 + 0.04 * torch.rand(8, device="cuda")
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(s_clean, s_pert, h)
    grads = torch.autograd.grad(loss, (s_clean, s_pert))
    eager_loss = step(s_clean, s_pert, h)
    eager_grads = torch.autograd.grad(eager_loss, (s_clean, s_pert))
    torch.testing.assert_close(loss, eager_loss)
    for g, eg in zip(grads, eager_grads):
        torch.testing.assert_close(g, eg)
    torch._dynamo.reset()
