"""Robust accuracy of a model under a list of L∞ attacks, and the worst case over them."""

import re

import torch

from ._common import (attack_mode, autocast_dtype, check_count, check_inputs, check_model, check_number,
                      logits_fp32, model_dtype)
from .attacks import cw_linf, fgsm, pgd
from .autoattack import autoattack
from .sanity import sanity_check

DEFAULT_ATTACKS = ("clean", "fgsm", "pgd20", "cw20", "autoattack")
_STEPPED = re.compile(r"(pgd|cw)(\d+)")


def parse_attack(name):
    """("clean" | "fgsm" | "autoattack", None) or ("pgd" | "cw", steps) for names like "pgd20", "cw50"."""
    if not isinstance(name, str):
        raise TypeError(f"attack names are strings, got {type(name).__name__}")
    if name in ("clean", "fgsm", "autoattack"):
        return name, None
    match = _STEPPED.fullmatch(name)
    if match and int(match.group(2)) >= 1:
        return match.group(1), int(match.group(2))
    raise ValueError(f"unknown attack {name!r}; expected clean, fgsm, autoattack, or pgdN / cwN with N >= 1 "
                     f"steps (e.g. pgd20, cw50)")


def run_attack(name, model, x, y, eps, *, precision="fp32", seed=None):
    """Adversarial inputs for one named attack as `evaluate` runs it: pgdN / cwN take N steps of size eps/4
    from a random start, one restart; autoattack is the standard version."""
    kind, steps = parse_attack(name)
    if kind == "clean":
        return x
    if kind == "fgsm":
        return fgsm(model, x, y, eps, precision=precision)
    if kind == "pgd":
        return pgd(model, x, y, eps, eps / 4, steps, random_start=True, restarts=1, precision=precision,
                   seed=seed)
    if kind == "cw":
        return cw_linf(model, x, y, eps, eps / 4, steps, random_start=True, restarts=1, precision=precision,
                       seed=seed)
    return autoattack(model, x, y, eps, version="standard", precision=precision, seed=seed,
                      batch_size=max(len(x), 1))


def _is_pair(data):
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


def _batches(data, batch_size):
    if _is_pair(data):
        x, y = data
        if x.shape[:1] != y.shape[:1]:
            raise ValueError(f"x and y must hold the same number of samples, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        for start in range(0, len(x), batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]
        return
    for item in data:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError("data must be an (x, y) pair of tensors or an iterable of (x, y) batches; "
                            f"got a batch of type {type(item).__name__}")
        yield item[0], item[1]


def _n_batches(data, batch_size):
    if _is_pair(data):
        return -(-len(data[0]) // batch_size)
    try:
        return len(data)
    except TypeError:
        return None


def _device_of(model):
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _attack_seed(seed, batch, attack):
    # One reproducible seed per (batch, attack), so adding an attack to the list leaves the others' draws alone.
    return None if seed is None else (seed * 1_000_003 + batch * 1_009 + attack) % (2 ** 63)


def evaluate(model, data, *, attacks=DEFAULT_ATTACKS, eps, batch_size=256, precision="fp32", seed=0,
             sanity_checks=True, progress=False):
    """Accuracy under each attack (L∞, radius ``eps`` on the [0, 1] scale) and the worst case over them.

    ``data``: an ``(x, y)`` pair of tensors (split into ``batch_size`` batches) or an iterable of ``(x, y)``
    batches; batches are moved to the model's device. ``attacks``: names from "clean", "fgsm", "pgdN", "cwN"
    (N steps of size eps/4 from a random start, one restart) and "autoattack" (standard version).

    A sample counts as robust to an attack when the model classifies both it and the attack's output
    correctly (misclassified samples are not attacked); "worst_case" counts the samples robust to every attack
    run, clean included. Returns ``{name: accuracy in [0, 1], ..., "worst_case": ...}``.

    ``sanity_checks`` runs `sanity_check` on the first batch (warnings, see `EvaluationWarning`); ``progress``
    shows a tqdm bar over batches × attacks."""
    check_model(model)
    eps = check_number("eps", eps)
    batch_size = check_count("batch_size", batch_size)
    if isinstance(attacks, str) or not attacks:
        raise TypeError(f"attacks must be a non-empty list of attack names, got {attacks!r}")
    names = list(attacks)
    for name in names:
        parse_attack(name)
    if len(set(names)) != len(names):
        raise ValueError(f"attacks lists a name twice: {names}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    device = _device_of(model)
    autocast = autocast_dtype(precision, device)

    from tqdm.auto import tqdm

    n_batches = _n_batches(data, batch_size)
    bar = tqdm(total=None if n_batches is None else n_batches * len(names), desc="eval", unit="attack",
               disable=not progress, leave=False)
    correct_counts = dict.fromkeys(names, 0)
    worst_count = n_total = 0
    with attack_mode(model), bar:
        input_dtype = model_dtype(model)

        def predict(inputs):
            with torch.no_grad():
                return logits_fp32(model, inputs, autocast, input_dtype).argmax(dim=1)

        for batch, (x, y) in enumerate(_batches(data, batch_size)):
            x, y = x.to(device), y.to(device)
            check_inputs(x, y)
            if batch == 0 and sanity_checks:
                sanity_check(model, x, y, precision=precision)
            clean_correct = predict(x) == y
            attacked = clean_correct.nonzero().squeeze(1)
            robust_to_all = clean_correct.clone()
            for index, name in enumerate(names):
                bar.set_postfix_str(name, refresh=False)
                correct = clean_correct.clone()
                if name != "clean" and len(attacked):
                    x_adv = run_attack(name, model, x[attacked], y[attacked], eps, precision=precision,
                                       seed=_attack_seed(seed, batch, index))
                    correct[attacked] = predict(x_adv) == y[attacked]
                correct_counts[name] += int(correct.sum())
                robust_to_all &= correct
                bar.update(1)
            worst_count += int(robust_to_all.sum())
            n_total += len(y)
    if n_total == 0:
        raise ValueError("data holds no samples")
    results = {name: count / n_total for name, count in correct_counts.items()}
    results["worst_case"] = worst_count / n_total
    return results
