"""The argument checks every layer shares (the ops, the losses, the attacks, the training options): a clear
TypeError or ValueError naming the argument, raised before any work is done."""

import math
import numbers

import torch


def check_choice(name, value, choices):
    """ValueError unless `value` is one of the strings `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")


def check_number(name, value, *, minimum=0, strict=False, integer=False, allow_none=False):
    """`value` as a float (an int when `integer`): TypeError unless it is a real number (an int when `integer`),
    not a bool; ValueError unless it is finite and >= minimum (> minimum when `strict`). None passes when
    `allow_none`."""
    if value is None and allow_none:
        return None
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an int' if integer else 'a real number'}, got {value!r}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{name} must be {bound}{'' if integer else ' and finite'}, got {value!r}")
    return int(value) if integer else float(value)


def check_count(name, value):
    """`value` as an int >= 1 (a number of steps, restarts, examples...)."""
    return check_number(name, value, minimum=1, integer=True)


FLOAT32_MAX = torch.finfo(torch.float32).max


def check_float32(name, value):
    """ValueError for a number beyond float32's range: the attacks compute in float32, where it is inf."""
    if value is not None and not abs(value) <= FLOAT32_MAX:
        raise ValueError(f"{name} {value!r} is beyond float32's range (±{FLOAT32_MAX:.4g}), the precision the attacks "
                         "compute in")
