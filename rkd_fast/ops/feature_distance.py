"""rkd_fast.feature_distance: the feature-map term of robust distillation.

One op per kernel family, a fused loss: the gradient is produced in the forward.
  rkd_fast::feature_distance_fwd         kernels registered from C++ (csrc/cpu, csrc/cuda)
  rkd_fast::feature_distance_fwd_triton  the Triton kernels (rkd_fast/ops/triton), a custom_op
Each returns (loss, grad_student, grad_teacher): the loss reduced as asked and, for each input whose flag is set,
the gradient of that loss for an upstream gradient of one. Per sample the kernels reduce the statistics, then
write the gradient while the sample is still resident (in cache on a CPU), so each input is read once and each
gradient written once. The backward scales the saved gradients by the upstream gradient, which for an
unweighted loss is a no-op (see _dispatch.scale_by_upstream). Per sample, every gradient is linear in the
inputs given a few per-sample numbers: d loss_i / d s_i = c0·s_i + c1·t_i, d loss_i / d t_i = c2·s_i + c3·t_i
(in "attention", for the maps, chained through Σ_c |F|^p).
"""

import math

import torch

from . import _reference
from ._dispatch import (REDUCTION_IDS, REDUCTIONS, check_choice, check_float_tensor, check_same_device,
                        choose_backend, scale_by_upstream)

MODES = ("mse", "normalized", "attention")
MODE_IDS = {name: i for i, name in enumerate(MODES)}  # the kernels' `mode` argument

SCHEMA = ("(Tensor student, Tensor teacher, int mode, float p, int reduction, bool grad_student,"
          " bool grad_teacher) -> (Tensor, Tensor, Tensor)")

_lib = torch.library.Library("rkd_fast", "FRAGMENT")
_lib.define("feature_distance_fwd" + SCHEMA)


def _fake(student, teacher, mode, p, reduction, grad_student, grad_teacher):
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss_shape = (student.shape[0],) if reduction == REDUCTION_IDS["none"] else ()
    return (student.new_empty(loss_shape, dtype=acc),
            torch.empty_like(student) if grad_student else student.new_empty((0,)),
            torch.empty_like(teacher) if grad_teacher else teacher.new_empty((0,)))


@torch.library.custom_op("rkd_fast::feature_distance_fwd_triton", mutates_args=())
def _triton_fwd(student: torch.Tensor, teacher: torch.Tensor, mode: int, p: float, reduction: int,
                grad_student: bool, grad_teacher: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton import feature_distance as kernel  # imports triton only when this backend runs
    return kernel.forward(student, teacher, mode, p, reduction, grad_student, grad_teacher)


def _setup_context(ctx, inputs, output):
    _, grad_s, grad_t = output
    ctx.computed = inputs[5], inputs[6]  # the gradients the forward produced
    ctx.mark_non_differentiable(grad_s, grad_t)
    ctx.set_materialize_grads(False)  # no gradient-sized zeros for the two gradient outputs
    ctx.save_for_backward(grad_s, grad_t)


def _backward(ctx, grad_loss, _grad_s, _grad_t):
    if grad_loss is None:  # the loss was not used (grads are not materialised, see _setup_context)
        return (None,) * 7
    grad_s, grad_t = ctx.saved_tensors
    return scale_by_upstream(grad_loss, grad_s if ctx.computed[0] else None,
                             grad_t if ctx.computed[1] else None) + (None,) * 5


torch.library.register_fake("rkd_fast::feature_distance_fwd", _fake, lib=_lib)
torch.library.register_autograd("rkd_fast::feature_distance_fwd", _backward, setup_context=_setup_context, lib=_lib)
_triton_fwd.register_fake(_fake)
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

    The gradient of each input that requires one is computed in the forward, in the same pass over the inputs as
    the loss, and kept for the backward (one tensor the size of that input), which multiplies it by the upstream
    gradient (nothing to do for an unweighted loss on CPU).

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
    grad = torch.is_grad_enabled()
    return op(student, teacher, MODE_IDS[mode], float(p), REDUCTION_IDS[reduction], grad and student.requires_grad,
              grad and teacher.requires_grad)[0]
