"""rkd_fast.feature_distance: the feature-map term of robust distillation.

The kernels come as two ops each, forward and backward, under one autograd formula:
  rkd_fast::feature_distance_fwd / _bwd               kernels registered from C++ (csrc/cpu, csrc/cuda)
  rkd_fast::feature_distance_fwd_triton / _bwd_triton  the Triton kernels (rkd_fast/ops/triton), custom_ops
The forward reads each input once and returns the per-sample losses, four per-sample coefficients and, in
mode "attention", the channel-summed maps. Every gradient is linear in the inputs given those:
    d loss_i / d s_i = c0·s_i + c1·t_i,   d loss_i / d t_i = c2·s_i + c3·t_i
(in "attention" this holds for the maps, chained through Σ_c |F|^p), so the backward reads the inputs once
and writes each needed gradient once, already scaled by the upstream gradient: no gradient-sized tensor is
kept between forward and backward, and one is allocated per input that needs it.
"""

import math

import torch

from . import _reference
from ._dispatch import REDUCTIONS, check_choice, check_float_tensor, check_same_device, choose_backend

MODES = ("mse", "normalized", "attention")
MODE_IDS = {name: i for i, name in enumerate(MODES)}  # the kernels' `mode` argument

FWD_SCHEMA = "(Tensor student, Tensor teacher, int mode, float p) -> (Tensor, Tensor, Tensor, Tensor)"
BWD_SCHEMA = ("(Tensor grad_losses, Tensor student, Tensor teacher, Tensor coeffs, Tensor map_s, Tensor map_t,"
              " int mode, float p, bool grad_student, bool grad_teacher) -> (Tensor, Tensor)")

_lib = torch.library.Library("rkd_fast", "FRAGMENT")
_lib.define("feature_distance_fwd" + FWD_SCHEMA)
_lib.define("feature_distance_bwd" + BWD_SCHEMA)


def _accumulation_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_fwd(student, teacher, mode, p):
    acc = _accumulation_dtype(student)
    n = student.shape[0]
    losses = student.new_empty((n,), dtype=acc)
    coeffs = student.new_empty((n, 4), dtype=acc)
    if mode == MODE_IDS["attention"]:
        map_shape = (n, student.shape[2] * student.shape[3])
        return losses, coeffs, student.new_empty(map_shape, dtype=acc), student.new_empty(map_shape, dtype=acc)
    return losses, coeffs, student.new_empty((0,), dtype=acc), student.new_empty((0,), dtype=acc)


def _fake_bwd(grad_losses, student, teacher, coeffs, map_s, map_t, mode, p, grad_student, grad_teacher):
    return (torch.empty_like(student) if grad_student else student.new_empty((0,)),
            torch.empty_like(teacher) if grad_teacher else teacher.new_empty((0,)))


@torch.library.custom_op("rkd_fast::feature_distance_fwd_triton", mutates_args=())
def _triton_fwd(student: torch.Tensor, teacher: torch.Tensor, mode: int,
                p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton import feature_distance as kernel  # imports triton only when this backend runs
    return kernel.forward(student, teacher, mode, p)


@torch.library.custom_op("rkd_fast::feature_distance_bwd_triton", mutates_args=())
def _triton_bwd(grad_losses: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, coeffs: torch.Tensor,
                map_s: torch.Tensor, map_t: torch.Tensor, mode: int, p: float, grad_student: bool,
                grad_teacher: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton import feature_distance as kernel
    return kernel.backward(grad_losses, student, teacher, coeffs, map_s, map_t, mode, p, grad_student, grad_teacher)


def _autograd_for(bwd_op):
    def setup_context(ctx, inputs, output):
        student, teacher, mode, p = inputs
        _, coeffs, map_s, map_t = output
        ctx.mode, ctx.p = mode, p
        ctx.mark_non_differentiable(coeffs, map_s, map_t)
        ctx.set_materialize_grads(False)  # no zero tensors for the outputs that get no gradient
        ctx.save_for_backward(student, teacher, coeffs, map_s, map_t)

    def backward(ctx, grad_losses, _coeffs, _map_s, _map_t):
        if grad_losses is None:  # the loss was not used (grads are not materialised, see setup_context)
            return None, None, None, None
        student, teacher, coeffs, map_s, map_t = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[:2]
        grad_s, grad_t = bwd_op(grad_losses.to(coeffs.dtype).contiguous(), student, teacher, coeffs, map_s, map_t,
                                ctx.mode, ctx.p, need_s, need_t)
        return grad_s if need_s else None, grad_t if need_t else None, None, None

    return backward, setup_context


torch.library.register_fake("rkd_fast::feature_distance_fwd", _fake_fwd, lib=_lib)
torch.library.register_fake("rkd_fast::feature_distance_bwd", _fake_bwd, lib=_lib)
_backward, _setup_context = _autograd_for(torch.ops.rkd_fast.feature_distance_bwd)
torch.library.register_autograd("rkd_fast::feature_distance_fwd", _backward, setup_context=_setup_context, lib=_lib)
_triton_fwd.register_fake(_fake_fwd)
_triton_bwd.register_fake(_fake_bwd)
_backward, _setup_context = _autograd_for(_triton_bwd)
_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(student, teacher, mode, p, reduction):
    check_float_tensor("student", student)
    check_float_tensor("teacher", teacher)
    check_choice("mode", mode, MODES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_same_device(student=student, teacher=teacher)
    if student.dim() < 1 or teacher.dim() < 1:
        raise ValueError("student and teacher need at least 1 dim (dim 0 is the batch), got shapes "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"batch sizes differ: student {student.shape[0]}, teacher {teacher.shape[0]}")
    if mode == "attention":
        if student.dim() != 4 or teacher.dim() != 4:
            raise ValueError("mode='attention' takes 4-D (N, C, H, W) feature maps, got shapes "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        if student.shape[2:] != teacher.shape[2:]:
            raise ValueError("mode='attention' needs equal spatial sizes, got student H, W = "
                             f"{tuple(student.shape[2:])} and teacher {tuple(teacher.shape[2:])}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
            raise ValueError(f"p must be a finite number > 0, got {p!r}")
    elif student.shape != teacher.shape:
        raise ValueError(f"mode={mode!r} needs equal shapes, got student {tuple(student.shape)} "
                         f"and teacher {tuple(teacher.shape)}")


def _memory_format(x):
    """The memory order a kernel can read in place, or None."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _kernel_layouts(student, teacher, mode):
    """Contiguous and channels_last tensors go to the kernels as they are. 'mse' and 'normalized' read both
    inputs as one flat block per sample, so they need the same element order: a teacher in the other of the
    two layouts is copied to the student's. Any other strides (slices, transposes) are copied to contiguous."""
    s_format, t_format = _memory_format(student), _memory_format(teacher)
    if s_format is None:
        student, s_format = student.contiguous(), torch.contiguous_format
    if mode == "attention":  # each map is indexed through its own (C, H*W) strides
        return student, teacher if t_format is not None else teacher.contiguous()
    if t_format != s_format:
        teacher = teacher.contiguous(memory_format=s_format)
    return student, teacher


def feature_distance(student, teacher, *, mode="normalized", p=2, reduction="mean", backend="auto"):
    """Per-sample distance between student and teacher feature maps, reduced over the batch.

    Dim 0 is the batch; every other dim is flattened, whatever the memory layout.

    - ``mode="mse"``: ``mean((s_i - t_i)**2)`` over the sample's elements.
    - ``mode="normalized"``: ``‖s_i/max(‖s_i‖, 1e-12) - t_i/max(‖t_i‖, 1e-12)‖²``.
    - ``mode="attention"``: attention transfer for 4-D ``(N, C, H, W)`` maps (channel counts may differ):
      ``a_i = Σ_c |F_i[c]|^p`` flattened over ``(H, W)`` and L2-normalised; ``loss_i = ‖a_s - a_t‖²``.

    Args:
        student, teacher: floating tensors (float32, float16, bfloat16, float64) on one device. When their
            dtypes differ the teacher is cast once to the student's dtype (one extra read of the teacher and
            one write of it in the student's dtype; the gradient still reaches a teacher that requires it).
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` (``N`` losses).
        backend: ``"auto"`` (C++ on CPU; on a GPU the CUDA kernel, among those that passed the GPU tests on a
            real GPU, see ``rkd_fast.backends()``), ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Contiguous and channels_last inputs are read in place. Other strides (a slice, a transposed view) are
    copied to contiguous first; in modes "mse" and "normalized" a teacher whose layout differs from the
    student's (one contiguous, the other channels_last) is copied to the student's layout.

    For the backward the op keeps references to the inputs (no copy) and a few numbers per sample.

    Returns the loss in float32 (float64 for float64 inputs): a 0-d tensor, or ``(N,)`` for ``"none"``.
    Accumulation is in float32 (float64 for float64). Gradients come back in each input's dtype.
    """
    _check(student, teacher, mode, p, reduction)
    chosen = choose_backend("feature_distance", backend, student.device)
    # Before the backend split, so every backend gives the same result (and result dtype) for mixed dtypes.
    if teacher.dtype != student.dtype:
        teacher = teacher.to(student.dtype)
    if chosen == "reference":
        return _reference.feature_distance(student, teacher, mode=mode, p=float(p), reduction=reduction)
    student, teacher = _kernel_layouts(student, teacher, mode)
    op = torch.ops.rkd_fast.feature_distance_fwd_triton if chosen == "triton" else torch.ops.rkd_fast.feature_distance_fwd
    losses = op(student, teacher, MODE_IDS[mode], float(p))[0]
    return _reference.reduce(losses, reduction)
