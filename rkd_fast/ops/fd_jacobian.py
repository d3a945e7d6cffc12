"""rkd_fast.fd_jacobian_loss: the finite-difference Jacobian term of robust distillation.

Two custom ops share one schema and one autograd formula:
  rkd_fast::fd_jacobian_fwd         kernels registered from C++ (csrc/cpu, csrc/cuda) per dispatch key
  rkd_fast::fd_jacobian_fwd_triton  the Triton kernel (rkd_fast/ops/triton), a torch.library.custom_op
Both return (loss, d loss / d s_clean, d loss / d s_pert): the loss reduced as asked and the student's gradients
for an upstream gradient of one. The kernel reads each row once and, when the student needs a gradient, writes
it in the same pass; the backward scales them by the upstream gradient, a no-op for an unweighted loss
(_dispatch.scale_by_upstream). One op call per use: the reduction is the kernel's, and h reaches it as a tensor
in the accumulation dtype (float32; float64 for float64 inputs), 0-d for one step or (N,) for one per row, so a
number and a tensor share one schema. A tensor h that needs its gradient gets per-sample losses from the op
(reduction "none"): loss_i = ‖D_i‖² / h_i², so d loss_i / d h_i = -2 loss_i / h_i. The teacher rows are constants.
"""

import math
from typing import Optional  # custom_op maps Optional[Tensor] to `Tensor?`

import torch

from . import _reference
from ._dispatch import (REDUCTION_IDS, REDUCTIONS, check_choice, check_float_tensor, check_same_device,
                        choose_backend, is_number, scale_by_upstream)

ON = ("logits", "probs")
ON_IDS = {name: i for i, name in enumerate(ON)}

# The op's options in one int: `on` (bit 0), the reduction (bits 1-2, its index in REDUCTIONS), and which student
# gradients to compute (bits 3 and 4). One argument rather than four because the autograd wrapper of
# torch.library spends O(arguments²) per call filling in defaults (57 µs at 10 arguments on this project's
# 2-core machine, more than the whole eager reference at small sizes); csrc/kernels.h decodes it.
GRAD_CLEAN, GRAD_PERT = 1 << 3, 1 << 4


def options(on, reduction, grad_clean, grad_pert):
    """The op's `options` argument."""
    return (ON_IDS[on] | REDUCTION_IDS[reduction] << 1 | (GRAD_CLEAN if grad_clean else 0)
            | (GRAD_PERT if grad_pert else 0))


def _reduction(options):
    return (options >> 1) & 3


SCHEMA = ("(Tensor s_clean, Tensor s_pert, Tensor h, Tensor? t_clean, Tensor? t_pert, float temperature,"
          " int options) -> (Tensor, Tensor, Tensor)")

_lib = torch.library.Library("rkd_fast", "FRAGMENT")
_lib.define("fd_jacobian_fwd" + SCHEMA)


def _fake(s_clean, s_pert, h, t_clean, t_pert, temperature, options):
    acc = torch.float64 if s_clean.dtype == torch.float64 else torch.float32
    loss = s_clean.new_empty((s_clean.shape[0],) if _reduction(options) == REDUCTION_IDS["none"] else (), dtype=acc)
    grad_c = s_clean.new_empty(s_clean.shape) if options & GRAD_CLEAN else s_clean.new_empty((0,))
    grad_p = s_pert.new_empty(s_pert.shape) if options & GRAD_PERT else s_pert.new_empty((0,))
    return loss, grad_c, grad_p


@torch.library.custom_op("rkd_fast::fd_jacobian_fwd_triton", mutates_args=())
def _triton_fwd(s_clean: torch.Tensor, s_pert: torch.Tensor, h: torch.Tensor, t_clean: Optional[torch.Tensor],
                t_pert: Optional[torch.Tensor], temperature: float,
                options: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton import fd_jacobian as kernel  # imports triton only when this backend runs
    return kernel.forward(s_clean, s_pert, h, t_clean, t_pert, temperature, options)


def _setup_context(ctx, inputs, output):
    loss, grad_c, grad_p = output
    ctx.computed = bool(inputs[6] & GRAD_CLEAN), bool(inputs[6] & GRAD_PERT)  # what the forward produced
    ctx.mark_non_differentiable(grad_c, grad_p)
    ctx.set_materialize_grads(False)  # no zeros for the two gradient outputs
    h = inputs[2]
    ctx.save_for_backward(grad_c, grad_p, *((loss, h) if h.requires_grad else ()))


def _backward(ctx, grad_loss, _grad_c, _grad_p):
    if grad_loss is None:  # the loss was not used (grads are not materialised, see _setup_context)
        return (None,) * 7
    grad_c, grad_p, *loss_and_h = ctx.saved_tensors
    grad_h = None
    if ctx.needs_input_grad[2]:  # from the per-sample losses (see the top of the module)
        losses, h = loss_and_h
        if losses.dim() == 0:
            raise RuntimeError("fd_jacobian_fwd gives h a gradient only with reduction 'none' (per-sample losses)")
        grad_h = grad_loss * (-2.0 * losses / h)
    return scale_by_upstream(grad_loss, grad_c if ctx.computed[0] else None,
                             grad_p if ctx.computed[1] else None) + (grad_h,) + (None,) * 4


torch.library.register_fake("rkd_fast::fd_jacobian_fwd", _fake, lib=_lib)
torch.library.register_autograd("rkd_fast::fd_jacobian_fwd", _backward, setup_context=_setup_context, lib=_lib)
_triton_fwd.register_fake(_fake)
_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a float argument is symbolic, and
    # comparisons are what Dynamo traces (False for NaN as well).
    if not is_number(temperature) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")

    shape = s_clean.shape
    teacher = t_clean is not None
    if len(shape) != 2 or s_pert.shape != shape or (teacher and (t_clean.shape != shape or t_pert.shape != shape)):
        named = (("s_clean", s_clean), ("s_pert", s_pert)) + ((("t_clean", t_clean), ("t_pert", t_pert)) if teacher
                                                                else ())
        for name, t in named:
            if t.dim() != 2:
                raise ValueError(f"{name} must be 2-D (N, K), got shape {tuple(t.shape)}")
        raise ValueError("s_clean, s_pert (and t_clean, t_pert) must have one shape (N, K), got "
                         + ", ".join(f"{name} {tuple(t.shape)}" for name, t in named))

    h_tensor = isinstance(h, torch.Tensor)
    if h_tensor:
        if not h.is_floating_point():
            raise TypeError(f"h must be a number or a floating-point tensor, got a {h.dtype} tensor")
        if h.shape not in ((), (shape[0],)):
            raise ValueError(f"a tensor h must have shape () or (N,) = ({shape[0]},), got {tuple(h.shape)}")
    elif not is_number(h):
        raise TypeError(f"h must be a number or a tensor, got {type(h).__name__}")
    device = s_clean.device
    if s_pert.device != device or (teacher and (t_clean.device != device or t_pert.device != device)) or (
            h_tensor and h.device != device):
        check_same_device(s_clean=s_clean, s_pert=s_pert, t_clean=t_clean, t_pert=t_pert, h=h if h_tensor else None)


_FINFO = {dtype: torch.finfo(dtype) for dtype in (torch.float32, torch.float64)}


def _check_range(h, temperature, acc, dtype):
    """h and 1/temperature are taken in the accumulation dtype `acc` (for inputs of `dtype`): a step or a
    temperature outside its normal range [tiny, max] would overflow there (h = 1e300 is inf in float32, and the
    loss silently 0) or have a reciprocal that does. A CUDA tensor h is not read (that would synchronise with the
    GPU), nor is any h under torch.compile, which cannot branch on it."""
    info = _FINFO[acc]

    def refuse(name, value, where=""):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be finite and > 0, got {value!r}{where}")
        raise ValueError(f"{name} = {value!r}{where} is outside the range of {acc} ({info.tiny:.3g} to "
                         f"{info.max:.3g}), the dtype fd_jacobian_loss computes in for {dtype} inputs: it or its "
                         "reciprocal would overflow")

    if not info.tiny <= temperature <= info.max:
        refuse("temperature", temperature)
    if not isinstance(h, torch.Tensor):
        if not info.tiny <= h <= info.max:  # False for NaN too
            refuse("h", h)
    elif h.device.type == "cpu" and not torch.compiler.is_compiling() and h.numel() > 0:
        ok = (h >= info.tiny) & (h <= info.max)  # in h's own dtype, before any cast to acc
        if not bool(ok.all()):
            index = int((~ok).flatten().nonzero()[0][0])
            refuse("h", h.flatten()[index].item(), f" at index {index}" if h.dim() else "")


_STEPS = {}  # (h, dtype, device) -> 0-d tensor: a constant step becomes a tensor once, not on every call


def _step_tensor(h, acc, device):
    if torch.compiler.is_compiling():
        return torch.full((), h, dtype=acc, device=device)
    key = (h, acc, device)
    if key not in _STEPS:
        if len(_STEPS) >= 64:  # a step that changes every call: keep the cache small
            _STEPS.clear()
        _STEPS[key] = torch.full((), h, dtype=acc, device=device)
    return _STEPS[key]


def _rows_in_place(x):
    """The kernels read rows through a row stride; each row must be unit-stride (any stride for K <= 1)."""
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def fd_jacobian_loss(s_clean, s_pert, h, *, t_clean=None, t_pert=None, on="logits", temperature=1.0,
                     reduction="mean", backend="auto"):
    """Finite-difference estimate of the input-Jacobian term along one direction, per sample.

    ``s_clean``, ``s_pert`` are the student's ``(N, K)`` outputs at ``x`` and ``x + h·d``; ``t_clean``, ``t_pert``
    (optional, both or neither) the teacher's. With ``g`` the identity (``on="logits"``) or
    ``softmax(· / temperature)`` over K (``on="probs"``):

    - with a teacher (Jacobian matching): ``‖(g(s_pert) - g(s_clean))/h - (g(t_pert) - g(t_clean))/h‖²``
    - without (Jacobian-norm penalty): ``‖(g(s_pert) - g(s_clean))/h‖²``

    Args:
        h: the step, a number > 0 or a floating tensor of shape ``()`` or ``(N,)`` on the inputs' device, within
            the range of the dtype the loss is computed in (float32, or float64 for float64 inputs). A CPU tensor
            is checked (finite, > 0, in range); a CUDA tensor is not, since reading it back would synchronise with
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
    dtype = s_clean.dtype
    for t in (s_pert, t_clean, t_pert):
        if t is not None and t.dtype is not dtype:
            dtype = torch.promote_types(dtype, t.dtype)
    acc = torch.float64 if dtype is torch.float64 else torch.float32
    _check_range(h, temperature, acc, dtype)
    chosen = choose_backend("fd_jacobian", backend, s_clean.device)
    # Before the backend split, so every backend gives the same result for mixed dtypes. The casts are
    # differentiable: the student's gradient returns to each input in its own dtype. The teacher is a constant
    # target: no backend passes it a gradient (the reference detaches it, the ops' backward gives it none).
    if s_clean.dtype is not dtype or s_pert.dtype is not dtype:
        s_clean, s_pert = s_clean.to(dtype), s_pert.to(dtype)
    if t_clean is not None and (t_clean.dtype is not dtype or t_pert.dtype is not dtype):
        t_clean, t_pert = t_clean.to(dtype), t_pert.to(dtype)
    if chosen == "reference":
        return _reference.fd_jacobian(s_clean, s_pert, h, t_clean, t_pert, on=on, temperature=float(temperature),
                                      reduction=reduction)
    s_clean, s_pert = _rows_in_place(s_clean), _rows_in_place(s_pert)
    if t_clean is not None:
        t_clean, t_pert = _rows_in_place(t_clean), _rows_in_place(t_pert)
    if not isinstance(h, torch.Tensor):
        h = _step_tensor(float(h), acc, s_clean.device)
    elif h.dim() == 1 or h.requires_grad:  # one step per row (and one h_i per loss_i for h's gradient)
        h = h.to(acc).expand(s_clean.shape[0]).contiguous()
    else:
        h = h.to(acc)
    grad_enabled = torch.is_grad_enabled()
    per_sample = grad_enabled and h.requires_grad  # h's gradient needs the per-sample losses
    op = torch.ops.rkd_fast.fd_jacobian_fwd_triton if chosen == "triton" else torch.ops.rkd_fast.fd_jacobian_fwd
    loss = op(s_clean, s_pert, h, t_clean, t_pert, float(temperature),
              options(on, "none" if per_sample else reduction, grad_enabled and s_clean.requires_grad,
                      grad_enabled and s_pert.requires_grad))[0]
    return _reference.reduce(loss, reduction) if per_sample else loss
