"""rkd_fast.fd_jacobian_loss: the finite-difference Jacobian term of robust distillation.

Two custom ops share one schema and one autograd formula:
  rkd_fast::fd_jacobian_fwd         kernels registered from C++ (csrc/cpu, csrc/cuda) per dispatch key
  rkd_fast::fd_jacobian_fwd_triton  the Triton kernel (rkd_fast/ops/triton), a torch.library.custom_op
Both return (per-sample losses, d loss_i / d s_clean_i, d loss_i / d s_pert_i): the kernel reads each row once
and, when the student needs a gradient, writes it in the same pass, so the backward is a per-sample scale.
The teacher rows are constants. h reaches the kernels as a per-sample tensor in the accumulation dtype
(float32; float64 for float64 inputs), so a number and a tensor share one schema; its gradient is closed-form:
loss_i = ‖D_i‖² / h_i², so d loss_i / d h_i = -2 loss_i / h_i.
"""

import math
from typing import Optional  # custom_op maps Optional[Tensor] to `Tensor?`

import torch

from . import _reference
from ._dispatch import REDUCTIONS, check_choice, check_float_tensor, check_same_device, choose_backend

ON = ("logits", "probs")
ON_IDS = {name: i for i, name in enumerate(ON)}  # the kernels' `on` argument

SCHEMA = ("(Tensor s_clean, Tensor s_pert, Tensor h, Tensor? t_clean, Tensor? t_pert, int on, float temperature,"
          " bool grad_clean, bool grad_pert) -> (Tensor, Tensor, Tensor)")

_lib = torch.library.Library("rkd_fast", "FRAGMENT")
_lib.define("fd_jacobian_fwd" + SCHEMA)


def _fake(s_clean, s_pert, h, t_clean, t_pert, on, temperature, grad_clean, grad_pert):
    acc = torch.float64 if s_clean.dtype == torch.float64 else torch.float32
    losses = s_clean.new_empty((s_clean.shape[0],), dtype=acc)
    grad_c = s_clean.new_empty(s_clean.shape) if grad_clean else s_clean.new_empty((0,))
    grad_p = s_pert.new_empty(s_pert.shape) if grad_pert else s_pert.new_empty((0,))
    return losses, grad_c, grad_p


@torch.library.custom_op("rkd_fast::fd_jacobian_fwd_triton", mutates_args=())
def _triton_fwd(s_clean: torch.Tensor, s_pert: torch.Tensor, h: torch.Tensor, t_clean: Optional[torch.Tensor],
                t_pert: Optional[torch.Tensor], on: int, temperature: float, grad_clean: bool,
                grad_pert: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton import fd_jacobian as kernel  # imports triton only when this backend runs
    return kernel.forward(s_clean, s_pert, h, t_clean, t_pert, on, temperature, grad_clean, grad_pert)


def _setup_context(ctx, inputs, output):
    losses, grad_c, grad_p = output
    ctx.needs = (inputs[7], inputs[8])
    ctx.save_for_backward(grad_c, grad_p, losses, inputs[2])


def _scale(grad_unit, grad_losses):
    # grad_unit is in the input's dtype; the per-sample factor is cast once to that dtype.
    return grad_unit * grad_losses.to(grad_unit.dtype).view(-1, 1)


def _backward(ctx, grad_losses, _unused_c, _unused_p):
    grad_c, grad_p, losses, h = ctx.saved_tensors
    need_c, need_p = ctx.needs
    grad_h = grad_losses * (-2.0 * losses / h) if ctx.needs_input_grad[2] else None
    return (_scale(grad_c, grad_losses) if need_c else None, _scale(grad_p, grad_losses) if need_p else None,
            grad_h, None, None, None, None, None, None)


torch.library.register_fake("rkd_fast::fd_jacobian_fwd", _fake, lib=_lib)
torch.library.register_autograd("rkd_fast::fd_jacobian_fwd", _backward, setup_context=_setup_context, lib=_lib)
_triton_fwd.register_fake(_fake)
_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(s_clean, s_pert, h, t_clean, t_pert, on, temperature, reduction):
    check_float_tensor("s_clean", s_clean)
    check_float_tensor("s_pert", s_pert)
    if (t_clean is None) != (t_pert is None):
        raise ValueError("give both t_clean and t_pert (Jacobian matching) or neither (Jacobian-norm penalty); "
                         f"got t_clean={'a tensor' if t_clean is not None else None}, "
                         f"t_pert={'a tensor' if t_pert is not None else None}")
    if t_clean is not None:
        check_float_tensor("t_clean", t_clean)
        check_float_tensor("t_pert", t_pert)
    check_choice("on", on, ON)
    check_choice("reduction", reduction, REDUCTIONS)
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")

    named = {"s_clean": s_clean, "s_pert": s_pert, "t_clean": t_clean, "t_pert": t_pert}
    for name, t in named.items():
        if t is not None and t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, K), got shape {tuple(t.shape)}")
    shapes = {name: tuple(t.shape) for name, t in named.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError("s_clean, s_pert (and t_clean, t_pert) must have one shape (N, K), got "
                         + ", ".join(f"{name} {shape}" for name, shape in shapes.items()))
    n = s_clean.shape[0]

    if isinstance(h, torch.Tensor):
        if not h.is_floating_point():
            raise TypeError(f"h must be a number or a floating-point tensor, got a {h.dtype} tensor")
        if h.shape not in ((), (n,)):
            raise ValueError(f"a tensor h must have shape () or (N,) = ({n},), got {tuple(h.shape)}")
        check_same_device(s_clean=s_clean, s_pert=s_pert, t_clean=t_clean, t_pert=t_pert, h=h)
        # Reading values back from a CUDA tensor would synchronise with the GPU, and torch.compile cannot
        # branch on them: h is checked only when it is a CPU tensor in eager mode.
        if h.device.type == "cpu" and not torch.compiler.is_compiling() and h.numel() > 0:
            bad = ~(torch.isfinite(h) & (h > 0))
            if bool(bad.any()):
                raise ValueError(f"h must be finite and > 0, got {h[bad].flatten()[0].item()!r} "
                                 f"at index {int(bad.nonzero()[0][0]) if h.dim() else 0}")
    elif _is_number(h):
        if not math.isfinite(h) or h <= 0:
            raise ValueError(f"h must be finite and > 0, got {h!r}")
        check_same_device(s_clean=s_clean, s_pert=s_pert, t_clean=t_clean, t_pert=t_pert)
    else:
        raise TypeError(f"h must be a number or a tensor, got {type(h).__name__}")


def _rows_in_place(x):
    """The kernels read rows through a row stride; each row must be unit-stride (any stride for K <= 1)."""
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def fd_jacobian_loss(s_clean, s_pert, h, *, t_clean=None, t_pert=None, on="logits", temperature=1.0,
                     reduction="mean", backend="auto"):
    """Finite-difference estimate of the input-Jacobian term along one direction, per sample.

    ``s_clean``, ``s_pert`` are the student's ``(N, K)`` outputs at ``x`` and ``x + h·d``; ``t_clean``, ``t_pert``
    (optional, both or neither) the teacher's. With ``g`` the identity (``on="logits"``) or
    ``softmax(· / temperature)`` over K (``on="probs"``):

    - with a teacher (Jacobian matching): ``‖(g(s_pert) - g(s_clean))/h - (g(t_pert) - g(t_clean))/h‖²``
    - without (Jacobian-norm penalty): ``‖(g(s_pert) - g(s_clean))/h‖²``

    Args:
        h: the step, a number > 0 or a floating tensor of shape ``()`` or ``(N,)`` on the inputs' device. A CPU
            tensor is checked (finite, > 0); a CUDA tensor is not, since reading it back would synchronise with
            the GPU (a zero step gives inf/nan losses). A tensor h that requires grad gets its gradient.
        t_clean, t_pert: the teacher is a constant target: no gradient flows to it, even if it requires grad.
        on: ``"logits"`` or ``"probs"``; ``temperature`` (> 0) is used by ``"probs"`` only.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` (``N`` losses).
        backend: ``"auto"`` (C++ on CPU; on a GPU the CUDA kernel, among those that passed the GPU tests on a
            real GPU, see ``rkd_fast.backends()``), ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Inputs may be float32, float16, bfloat16 or float64; inputs of different dtypes are promoted to a common
    one (a copy of the others). Differences and sums are taken in float32 inside the kernel (float64 for
    float64). Rows are read in place when unit-stride (a row slice of a wider tensor too); other layouts are
    copied to contiguous.

    Returns the loss in float32 (float64 for float64 inputs): a 0-d tensor, or ``(N,)`` for ``"none"``.
    Gradients to ``s_clean`` and ``s_pert`` come back in each one's dtype.
    """
    _check(s_clean, s_pert, h, t_clean, t_pert, on, temperature, reduction)
    chosen = choose_backend("fd_jacobian", backend, s_clean.device)
    teacher = (t_clean, t_pert) if t_clean is not None else ()
    dtype = s_clean.dtype
    for t in (s_pert,) + teacher:
        dtype = torch.promote_types(dtype, t.dtype)
    # Before the backend split, so every backend gives the same result for mixed dtypes. The casts are
    # differentiable: the student's gradient returns to each input in its own dtype.
    s_clean, s_pert = s_clean.to(dtype), s_pert.to(dtype)
    if t_clean is not None:  # a constant target: detached, so no gradient reaches it
        t_clean, t_pert = t_clean.detach().to(dtype), t_pert.detach().to(dtype)
    if chosen == "reference":
        return _reference.fd_jacobian(s_clean, s_pert, h, t_clean, t_pert, on=on, temperature=float(temperature),
                                      reduction=reduction)
    s_clean, s_pert = _rows_in_place(s_clean), _rows_in_place(s_pert)
    if t_clean is not None:
        t_clean, t_pert = _rows_in_place(t_clean), _rows_in_place(t_pert)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n = s_clean.shape[0]
    if isinstance(h, torch.Tensor):
        h_rows = h.to(acc).expand(n).contiguous()
    else:
        h_rows = torch.full((n,), float(h), dtype=acc, device=s_clean.device)
    grad_enabled = torch.is_grad_enabled()
    op = torch.ops.rkd_fast.fd_jacobian_fwd_triton if chosen == "triton" else torch.ops.rkd_fast.fd_jacobian_fwd
    losses, _, _ = op(s_clean, s_pert, h_rows, t_clean, t_pert, ON_IDS[on], float(temperature),
                      grad_enabled and s_clean.requires_grad, grad_enabled and s_pert.requires_grad)
    return _reference.reduce(losses, reduction)
