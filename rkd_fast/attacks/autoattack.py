"""AutoAttack (Croce & Hein, 2020) through the reference implementation, pyautoattack: not rewritten here.

pyautoattack runs the model in whatever precision the model has; mixed precision is added by wrapping the model
in `AutocastLogits`, which runs the forward under autocast and hands fp32 logits back, so AutoAttack's
perturbations, losses and step-size rules all stay fp32."""

import torch
from torch import nn

from ..checks import check_choice, check_count, check_number
from ..precision import autocast_dtype
from ._common import (NORMS, attack_mode, check_inputs, check_labels, check_model, like_input, logits_fp32, model_dtype,
                      to_attack_layout)

VERSIONS = ("standard", "plus", "rand", "custom")
CUSTOM_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
_AA_NORM = {"linf": "Linf", "l2": "L2"}


def _import_autoattack():
    # The PyPI package pyautoattack installs the module `pyautoattack`; a source install of
    # fra31/auto-attack installs the same code as `autoattack`.
    try:
        import pyautoattack
        return pyautoattack
    except ImportError:
        pass
    try:
        import autoattack
        return autoattack
    except ImportError as error:
        raise ImportError("autoattack() needs AutoAttack: pip install pyautoattack "
                          "(or rkd_fast[attacks])") from error


class AutocastLogits(nn.Module):
    """model(x) under autocast to `dtype` (None: plain fp32), inputs in channels_last when 4-D, logits in fp32."""

    def __init__(self, model, dtype=None):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.input_dtype = model_dtype(model)

    def forward(self, x):
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return logits_fp32(self.model, x, self.dtype, self.input_dtype)


def autoattack(model, x, y, eps, *, norm="linf", version="standard", precision="fp32", seed=None,
               attacks=None, batch_size=256):
    """AutoAttack's adversarial inputs for (x, y).

    version "standard" runs APGD-CE, APGD-T, FAB-T and Square, each on the samples still robust; "custom"
    runs the list given in ``attacks`` (from apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square) with AutoAttack's
    default settings. Samples the model misclassifies come back unchanged. ``seed`` seeds AutoAttack (it
    seeds torch's global RNG; that state is saved and restored around the call); None lets AutoAttack pick a
    time-based seed."""
    check_model(model)
    check_inputs(x, y)
    eps = check_number("eps", eps)
    check_choice("norm", norm, NORMS)
    check_choice("version", version, VERSIONS)
    batch_size = check_count("batch_size", batch_size)
    if version == "custom":
        if not attacks or isinstance(attacks, str) or any(a not in CUSTOM_ATTACKS for a in attacks):
            raise ValueError(f"version='custom' needs attacks, a list from {', '.join(CUSTOM_ATTACKS)}; "
                             f"got {attacks!r}")
        attacks = list(attacks)
    elif attacks is not None:
        raise ValueError(f"attacks is only used with version='custom' (version={version!r} fixes its own)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    autocast = autocast_dtype(precision, x.device)
    if x.shape[0] == 0 or eps == 0:
        return x.clone()
    AutoAttack = _import_autoattack().AutoAttack

    x0 = to_attack_layout(x).contiguous()
    with attack_mode(model):
        wrapped = AutocastLogits(model, autocast)
        with torch.no_grad():
            check_labels(y, wrapped(x0[:1]).shape[1])
        adversary = AutoAttack(wrapped, norm=_AA_NORM[norm], eps=eps, version=version, attacks=attacks,
                               seed=seed, device=x.device)
        forked = [x.device.index if x.device.index is not None else torch.cuda.current_device()] \
            if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked):
            x_adv, _ = adversary.run_standard_evaluation(x0, y, batch_size=batch_size)
    return like_input(x_adv, x)
