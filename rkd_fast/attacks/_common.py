"""What every attack shares: argument checks, the precision of the forward pass, and the model's state during
an attack (eval mode, parameters frozen, both restored afterwards)."""

import contextlib
import numbers

import torch
from torch import nn


NORMS = ("linf", "l2")
LOSSES = ("ce", "cw")


def check_model(model):
    # The attacks change and restore the module's mode and its parameters' requires_grad, so it must be a Module.
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module returning logits, got {type(model).__name__}")


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
