"""What every rkd_fast.fd_jacobian_loss test shares, on every backend and device: the inputs (`make_pair`, `make_h`),
the oracle (the reference evaluated in float64 on the same input values, autograd for the gradients), the
comparison with one tolerance table, and the kernels called directly."""

import torch
from _op_backends import assert_close_scaled

import rkd_fast
from rkd_fast.ops._reference import fd_jacobian as reference

ON = ("logits", "probs")
REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# (rtol, atol as a fraction of the largest expected magnitude) of the losses and of the gradients, by the
# students' dtype, from the two things that round:
# - The differences. Every kernel takes s(x + h·d) - s(x) in float32 (float64 for float64) from the input values,
#   so a loss is nearly as exact as float32 whatever the input dtype. Two nearby logits differ exactly (Sterbenz);
#   two nearby softmax probabilities, each a few u off (u = 2^-24), differ by about step·p, so their difference
#   carries those roundings times |p|/|Δp| ≈ 1/step = 20 at the tests' step 0.05, twice in a square: ≈ 1e-5 at a
#   few standard deviations, hence 5e-5, and the same number of float64 ulps for float64. The gradient of a
#   tensor h, -2·loss/h per sample, is as exact as the loss.
# - The gradients' rounding to the input dtype, twice (the per-sample unit gradient, then its scale): up to 2
#   half-ulps, within 2·eps = 2^-9 ≈ 2e-3 for float16 and 2^-6 ≈ 1.6e-2 for bfloat16, relative to each element
#   (float32's are far below its differences' error).
_DIFFERENCES = {torch.float32: 5e-5,
                torch.float64: 5e-5 * torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps}
LOSS_TOL = {dtype: (_DIFFERENCES[torch.float64 if dtype == torch.float64 else torch.float32],) * 2
            for dtype in DTYPES}
GRAD_TOL = {**LOSS_TOL, torch.float16: (2e-3, _DIFFERENCES[torch.float32]),
            torch.bfloat16: (1.6e-2, _DIFFERENCES[torch.float32])}

KERNEL_OPS = {"cpu": "fd_jacobian_fwd", "cuda": "fd_jacobian_fwd", "triton": "fd_jacobian_fwd_triton"}


def make_pair(n, k, dtype=torch.float32, device="cpu", step=0.05, requires_grad=True):
    """Outputs at x and at x + h·d: the second is the first plus a change of about the size of the step, as a
    smooth model gives, so (s_pert - s_clean)/h is O(1). Drawn on the CPU: the same values on every device."""
    clean = 2 * torch.randn(n, k)
    pert = clean + step * torch.randn(n, k)
    return tuple(x.to(dtype).to(device).requires_grad_(requires_grad) for x in (clean, pert))


def make_h(kind, n, device="cpu", requires_grad=False):
    """The step: a float, a 0-d tensor (one step for every row), or a tensor of one step per row."""
    if kind == "float":
        return 0.05
    if kind == "0-d tensor":
        return torch.tensor(0.04).to(device).requires_grad_(requires_grad)
    return (0.03 + 0.04 * torch.rand(n)).to(device).requires_grad_(requires_grad)


def f64(x):
    """A float64 leaf of x's values that requires grad as x does (numbers and None as they are)."""
    return x.detach().double().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x


def oracle(s_clean, s_pert, h, t_clean=None, t_pert=None, **options):
    """The reference in float64 on the same values."""
    return reference(*map(f64, (s_clean, s_pert, h, t_clean, t_pert)), **options)


def check_op(s_clean, s_pert, h, *, teacher=None, on="logits", temperature=1.0, reduction="mean", backend):
    """Runs the op, then checks the loss and the gradient of every input that requires one (s_clean, s_pert,
    a tensor h) against the oracle; a different weight per sample checks that the backward scales each sample
    by its own upstream gradient. Returns the loss."""
    t_clean, t_pert = teacher if teacher is not None else (None, None)
    loss = rkd_fast.fd_jacobian_loss(s_clean, s_pert, h, t_clean=t_clean, t_pert=t_pert, on=on,
                                     temperature=temperature, reduction=reduction, backend=backend)
    args64 = tuple(map(f64, (s_clean, s_pert, h, t_clean, t_pert)))
    expected = reference(*args64, on=on, temperature=temperature, reduction=reduction)

    acc = torch.float64 if s_clean.dtype == torch.float64 else torch.float32
    assert loss.dtype == acc
    assert loss.shape == expected.shape == ((s_clean.shape[0],) if reduction == "none" else ())
    assert_close_scaled(loss, expected, LOSS_TOL[s_clean.dtype], what=f"{backend} {on} loss")

    inputs = [x for x in (s_clean, s_pert, h) if isinstance(x, torch.Tensor) and x.requires_grad]
    assert loss.requires_grad == bool(inputs)
    if not inputs:
        return loss
    weight = (torch.rand(expected.shape, dtype=torch.float64) + 0.5).to(loss.device)
    grads = torch.autograd.grad(loss, inputs, weight.to(loss.dtype))
    expected_grads = torch.autograd.grad(
        expected, [x for x in args64[:3] if isinstance(x, torch.Tensor) and x.requires_grad], weight)
    for x, g, g64 in zip(inputs, grads, expected_grads):
        assert g.dtype == x.dtype and g.shape == x.shape
        tol = GRAD_TOL[s_clean.dtype] if x is not h else LOSS_TOL[h.dtype]
        assert_close_scaled(g, g64, tol, what=f"{backend} {on} {'h' if x is h else 'student'} grad")
    return loss


def kernel(backend):
    """The op of `backend`'s kernel (its schema: s_clean, s_pert, h, t_clean, t_pert, temperature, options)."""
    return getattr(torch.ops.rkd_fast, KERNEL_OPS[backend])
