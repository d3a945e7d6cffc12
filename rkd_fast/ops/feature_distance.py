"""rkd_fast.feature_distance: the feature-map term of robust distillation.

Two custom ops share one schema and one autograd formula:
  rkd_fast::feature_distance_fwd         kernels registered from C++ (csrc/cpu, csrc/cuda) per dispatch key
  rkd_fast::feature_distance_fwd_triton  the Triton kernel (rkd_fast/ops/triton), a torch.library.custom_op
Both return (per-sample losses, d loss_i / d student_i, d loss_i / d teacher_i): when an input needs a
gradient the kernel computes it in the same pass that reads the sample, so the backward is a per-sample scale.
"""

import math

import torch

from . import _reference
from ._dispatch import REDUCTIONS, check_choice, check_float_tensor, check_same_device, choose_backend

MODES = ("mse", "normalized", "attention")
MODE_IDS = {name: i for i, name in enumerate(MODES)}  # the kernels' `mode` argument

SCHEMA = ("(Tensor student, Tensor teacher, int mode, float p, bool grad_student, bool grad_teacher)"
          " -> (Tensor, Tensor, Tensor)")

_lib = torch.library.Library("rkd_fast", "FRAGMENT")
_lib.define("feature_distance_fwd" + SCHEMA)


def _fake(student, teacher, mode, p, grad_student, grad_teacher):
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    losses = student.new_empty((student.shape[0],), dtype=acc)
    grad_s = torch.empty_like(student) if grad_student else student.new_empty((0,))
    grad_t = torch.empty_like(teacher) if grad_teacher else teacher.new_empty((0,))
    return losses, grad_s, grad_t


@torch.library.custom_op("rkd_fast::feature_distance_fwd_triton", mutates_args=())
def _triton_fwd(student: torch.Tensor, teacher: torch.Tensor, mode: int, p: float, grad_student: bool,
                grad_teacher: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton import feature_distance as kernel  # imports triton only when this backend runs
    return kernel.forward(student, teacher, mode, p, grad_student, grad_teacher)


def _setup_context(ctx, inputs, output):
    _, grad_s, grad_t = output
    ctx.needs = (inputs[4], inputs[5])
    ctx.save_for_backward(grad_s, grad_t)


def _scale(grad_unit, grad_losses):
    # grad_unit keeps the input's dtype and memory format; the per-sample factor is cast once to that dtype.
    shape = (-1,) + (1,) * (grad_unit.dim() - 1)
    return grad_unit * grad_losses.to(grad_unit.dtype).view(shape)


def _backward(ctx, grad_losses, _unused_s, _unused_t):
    grad_s, grad_t = ctx.saved_tensors
    need_s, need_t = ctx.needs
    return (_scale(grad_s, grad_losses) if need_s else None, _scale(grad_t, grad_losses) if need_t else None,
            None, None, None, None)


torch.library.register_fake("rkd_fast::feature_distance_fwd", _fake, lib=_lib)
torch.library.register_autograd("rkd_fast::feature_distance_fwd", _backward, setup_context=_setup_context,
                                lib=_lib)
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
        backend: ``"auto"`` (C++ on CPU; on a GPU the reference until a GPU kernel has passed the GPU tests on
            a real GPU, see ``rkd_fast.backends()``), ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Contiguous and channels_last inputs are read in place. Other strides (a slice, a transposed view) are
    copied to contiguous first; in modes "mse" and "normalized" a teacher whose layout differs from the
    student's (one contiguous, the other channels_last) is copied to the student's layout.

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
    grad_enabled = torch.is_grad_enabled()
    op = torch.ops.rkd_fast.feature_distance_fwd_triton if chosen == "triton" else torch.ops.rkd_fast.feature_distance_fwd
    losses, _, _ = op(student, teacher, MODE_IDS[mode], float(p), grad_enabled and student.requires_grad,
                      grad_enabled and teacher.requires_grad)
    return _reference.reduce(losses, reduction)
