"""What every attack shares: argument checks, the precision of the forward pass, and the model's state during
an attack (eval mode, parameters frozen, both restored afterwards)."""

import contextlib
import functools
import math
import numbers

import torch
from torch import nn

from ..ops._dispatch import check_choice  # noqa: F401  (one definition for the ops and the attacks)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NORMS = ("linf", "l2")
LOSSES = ("ce", "cw")


def check_model(model):
    # The attacks change and restore the module's mode and its parameters' requires_grad, so it must be a Module.
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module returning logits, got {type(model).__name__}")


def check_number(name, value, *, positive=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, got {value}")
    return value


FLOAT32_MAX = torch.finfo(torch.float32).max


def check_float32(name, value):
    """ValueError for a number beyond float32's range: the attacks compute in float32, where it is inf."""
    if value is not None and not abs(value) <= FLOAT32_MAX:
        raise ValueError(f"{name} {value!r} is beyond float32's range (±{FLOAT32_MAX:.4g}), the precision the attacks "
                         "compute in")


def check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_inputs(x, y):
    """x: floating (N, ...) in [0, 1]; y: integer (N,) on the same device.

    Inputs outside [0, 1] are an error, not a warning: they almost always mean the data were normalised
    outside the model, and an attack clipping to [0, 1] would then silently evaluate the wrong thing."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor of inputs in [0, 1], got {x.dtype}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"y must be an integer tensor of class indices, got {y.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must be batched, shape (N, ...), got shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape (N,) = ({x.shape[0]},) to match x {tuple(x.shape)}, "
                         f"got {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got x on {x.device}, y on {y.device}")
    if not x.numel():
        return
    # One reduction on the device and one value read back: this runs on every batch of every attack. NaN fails
    # both comparisons, so NaN and ±Inf inputs are refused here too.
    low, high = torch.aminmax(x.detach())
    if not bool((low >= 0) & (high <= 1)):
        bad = (~torch.isfinite(x)).sum().item()
        if bad:
            raise ValueError(f"x holds {bad} NaN or infinite value(s); inputs must be finite, in [0, 1]")
        raise ValueError(f"x must lie in [0, 1] (normalisation belongs inside the model), got values in "
                         f"[{low.item():.4g}, {high.item():.4g}]")


def check_labels(y, num_classes):
    """Labels of an (N,) integer tensor are class indices of a model with `num_classes` outputs (one reduction
    on the device, one value read back)."""
    if not y.numel():
        return
    low, high = torch.aminmax(y)
    if not bool((low >= 0) & (high < num_classes)):
        raise ValueError(f"labels must lie in [0, {num_classes}) for a model with {num_classes} outputs, "
                         f"got values in [{low.item()}, {high.item()}]")


@functools.lru_cache(maxsize=None)
def _autocast_works(device_type, dtype):
    """Whether autocast to `dtype` runs a matmul on `device_type` (probed once per pair)."""
    if not torch.amp.autocast_mode.is_autocast_available(device_type):
        return False
    try:
        with torch.autocast(device_type, dtype=dtype):
            a = torch.ones(2, 2, device=device_type)
            return (a @ a).dtype == dtype
    except (RuntimeError, ValueError, AssertionError):
        return False


def autocast_dtype(precision, device):
    """The autocast dtype for `precision` ("fp32" → None), or a clear error when `device` cannot run it."""
    check_choice("precision", precision, tuple(PRECISIONS))
    dtype = PRECISIONS[precision]
    if dtype is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(
            including_emulation=False):
        raise ValueError(f"precision={precision!r}: this CUDA device has no native bfloat16; use 'fp16' or 'fp32'")
    if not _autocast_works(device.type, dtype):
        raise ValueError(f"precision={precision!r} is not supported on {device.type} (autocast to {dtype} "
                         f"is unavailable there); use 'fp32'")
    return dtype


def autocast_factory(device, dtype):
    """A zero-argument factory of the context the forward passes run in: autocast to `dtype` on `device`'s type,
    or no autocast when dtype is None (fp32). The one way the trainer, the methods and the bench build it."""
    if dtype is None:
        return contextlib.nullcontext
    device_type = torch.device(device).type
    return lambda: torch.autocast(device_type, dtype=dtype)


def model_dtype(model):
    """The dtype the model's first floating parameter has: inputs are fed to the model in it."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def logits_fp32(model, x, autocast, input_dtype=torch.float32):
    """model(x) with the forward under autocast when asked; the logits come back in fp32 so that the loss
    (and its gradient up to the logits) is computed in fp32 whatever the forward's precision."""
    x = x.to(input_dtype)
    if autocast is None:
        return model(x).float()
    with torch.autocast(x.device.type, dtype=autocast):
        out = model(x)
    return out.float()


def input_gradient(loss, x):
    """d loss / d x, zeros where the loss does not depend on x at all (a constant model: gradient masking at its
    extreme, which the sanity check reports) rather than autograd's RuntimeError."""
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def to_attack_layout(x):
    """x detached in fp32, channels_last when 4-D (the fast layout for convolutions on GPU); possibly x itself,
    which the attacks never write to."""
    x = x.detach().float()
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def like_input(x_adv, x):
    """x_adv with x's dtype and memory layout."""
    return torch.empty_like(x).copy_(x_adv)


@contextlib.contextmanager
def attack_mode(model):
    """Eval mode and frozen parameters for the duration of an attack; every submodule's mode and every
    parameter's requires_grad is put back as it was, also when the attack raises.

    Frozen parameters mean the backward pass only reaches the input and no `.grad` is ever written."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


def make_generator(seed, device):
    """A local generator (the global RNG is never touched): seeded when `seed` is given, random otherwise."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        generator.manual_seed(int(seed))
    return generator
