"""Robust accuracy of a model under a list of attacks (L∞ or L2), and the worst case over them."""

import re
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import seeding
from ..checks import check_choice, check_count, check_number
from ..precision import autocast_dtype
from ._common import NORMS, attack_mode, check_inputs, check_labels, check_model, logits_fp32, model_dtype
from .attacks import fgsm, pgd
from .autoattack import CUSTOM_ATTACKS, autoattack
from .sanity import sanity_check

DEFAULT_ATTACKS = ("clean", "fgsm", "pgd20", "cw20", "autoattack")
DEFAULT_ATTACKS_L2 = ("clean", "pgd20", "cw20", "autoattack")  # FGSM is an L∞ attack
AUTOATTACK_VERSIONS = {"autoattack": "standard", "autoattack-plus": "plus", "autoattack-rand": "rand"}
_CUSTOM = "autoattack:"
_NORM_NAMES = {"linf": "L∞", "l2": "L2"}
NOT_THIS = object()  # what a NamedAttack's `parse` returns for a name that is not one of its own


@dataclass(frozen=True)
class NamedAttack:
    """An attack `evaluate` runs by name. ``parse(name)``: the parameter a name of this attack gives (None when
    it takes none), NOT_THIS for a name of another attack, ValueError for a malformed one of its own. ``run(param,
    model, x, y, eps, norm=, precision=, seed=)``: its adversarial inputs. ``help``: how its names read. ``norms``:
    the threat models it serves."""

    parse: Callable[[str], object]
    run: Callable[..., torch.Tensor]
    help: str
    norms: tuple = NORMS
    gradient_free: Callable[[object], bool] = lambda param: False  # whether a name's attack uses no gradient


def _exactly(word):
    return lambda name: None if name == word else NOT_THIS


def _with_steps(prefix):
    """Names prefixN, N >= 1 (the number of steps)."""
    pattern = re.compile(rf"{prefix}(\d+)")

    def parse(name):
        match = pattern.fullmatch(name)
        return int(match.group(1)) if match and int(match.group(1)) >= 1 else NOT_THIS

    return parse


def _autoattack_spec(name):
    """A version ("autoattack" is the standard one) or a custom list, autoattack:A+B+..."""
    if name in AUTOATTACK_VERSIONS:
        return AUTOATTACK_VERSIONS[name]
    if not name.startswith(_CUSTOM):
        return NOT_THIS
    parts = tuple(name[len(_CUSTOM):].split("+"))
    unknown = [part for part in parts if part not in CUSTOM_ATTACKS]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(f"bad custom AutoAttack {name!r}: expected autoattack:A+B+... with distinct attacks "
                         f"from {', '.join(CUSTOM_ATTACKS)}")
    return parts


def _clean(_, model, x, y, eps, *, norm, precision, seed):
    return x


def _fgsm(_, model, x, y, eps, *, norm, precision, seed):
    return fgsm(model, x, y, eps, precision=precision)


def _pgd_on(loss):
    """pgdN / cwN: N steps of size eps/4 from a random start, one restart."""
    def run(steps, model, x, y, eps, *, norm, precision, seed):
        return pgd(model, x, y, eps, eps / 4, steps, norm=norm, loss=loss, random_start=True, restarts=1,
                   precision=precision, seed=seed)

    return run


def _autoattack(spec, model, x, y, eps, *, norm, precision, seed):
    version, attacks = (spec, None) if isinstance(spec, str) else ("custom", list(spec))
    return autoattack(model, x, y, eps, norm=norm, version=version, attacks=attacks, precision=precision, seed=seed,
                      batch_size=max(len(x), 1))


# Attack kind → how its names read and how it runs: a new attack is one entry here, beside its function.
ATTACKS = {
    "clean": NamedAttack(_exactly("clean"), _clean, "clean"),
    "fgsm": NamedAttack(_exactly("fgsm"), _fgsm, "fgsm (L∞ only)", norms=("linf",)),
    "pgd": NamedAttack(_with_steps("pgd"), _pgd_on("ce"),
                       "pgdN (N steps of eps/4 from a random start, on the cross-entropy)"),
    "cw": NamedAttack(_with_steps("cw"), _pgd_on("cw"), "cwN (the same on the CW margin loss)"),
    "autoattack": NamedAttack(_autoattack_spec, _autoattack,
                              "autoattack (standard), autoattack-plus, autoattack-rand (for randomised models); "
                              "autoattack:A+B+... (AutoAttack's " + ", ".join(CUSTOM_ATTACKS) + " in that order)",
                              # Square, the score-based attack, is in the standard and plus versions
                              gradient_free=lambda spec: "square" in spec if isinstance(spec, tuple) else
                              spec in ("standard", "plus")),
}
ATTACK_NAMES_HELP = "; ".join(attack.help for attack in ATTACKS.values())
ATTACKS_WITHOUT_GRADIENTS = "autoattack, autoattack-plus or autoattack:...+square"


def gradient_only(names, norm="linf"):
    """A caveat (str) when the attacks `names` attack only with gradients (clean aside), else None: a model
    whose gradients mislead (masking, obfuscation) then looks robust, and nothing in the list would say so."""
    attacks = [parse_attack(name, norm) for name in names]
    attacks = [(kind, param) for kind, param in attacks if kind != "clean"]
    if not attacks or any(ATTACKS[kind].gradient_free(param) for kind, param in attacks):
        return None
    return (f"only gradient attacks ran ({', '.join(n for n in names if n != 'clean')}): their accuracy is an upper "
            f"bound that a model with misleading gradients inflates; a robustness claim needs a gradient-free "
            f"attack too ({ATTACKS_WITHOUT_GRADIENTS}, whose Square attack uses none)")


def parse_attack(name, norm="linf"):
    """What an attack name means: (kind, parameter), the kind a key of ATTACKS: ("clean" | "fgsm", None),
    ("pgd" | "cw", steps) for names like "pgd20", ("autoattack", version) for "autoattack" (standard),
    "autoattack-plus", "autoattack-rand", or ("autoattack", (attack, ...)) for a custom list
    "autoattack:apgd-ce+square". Raises ValueError for an unknown name and for an attack outside the threat model
    ``norm`` (fgsm under "l2")."""
    if not isinstance(name, str):
        raise TypeError(f"attack names are strings, got {type(name).__name__}")
    check_choice("norm", norm, NORMS)
    for kind, attack in ATTACKS.items():
        param = attack.parse(name)
        if param is NOT_THIS:
            continue
        if norm not in attack.norms:
            served = "/".join(_NORM_NAMES[n] for n in attack.norms)
            raise ValueError(f"{name} is an {served} attack; under norm {norm!r} use pgdN (e.g. pgd20)")
        return kind, param
    raise ValueError(f"unknown attack {name!r}; expected one of: {ATTACK_NAMES_HELP}")


def run_attack(name, model, x, y, eps, *, norm="linf", precision="fp32", seed=None):
    """Adversarial inputs for one named attack (see `parse_attack`) as `evaluate` runs it: pgdN / cwN take N
    steps of size eps/4 from a random start, one restart; the AutoAttack versions run through pyautoattack."""
    kind, param = parse_attack(name, norm)
    return ATTACKS[kind].run(param, model, x, y, eps, norm=norm, precision=precision, seed=seed)


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
    return None if seed is None else seeding.derive_seed(seed, "batch", batch, "attack", attack)


@dataclass
class Evaluation:
    """What `run_evaluation` measured: ``accuracy`` {attack: accuracy in [0, 1], ..., "worst_case": ...},
    ``seconds`` {attack: seconds spent in it, the clean forward for "clean"}, ``n_examples`` samples."""

    accuracy: dict
    seconds: dict
    n_examples: int


def run_evaluation(model, data, *, attacks=None, eps, norm="linf", batch_size=256, precision="fp32", seed=0,
                   sanity_checks=True, progress=False):
    """`evaluate`, returning an `Evaluation`: the accuracies, each attack's seconds and the number of samples."""
    check_model(model)
    check_choice("norm", norm, NORMS)
    eps = check_number("eps", eps, strict=True)
    batch_size = check_count("batch_size", batch_size)
    if attacks is None:
        attacks = DEFAULT_ATTACKS if norm == "linf" else DEFAULT_ATTACKS_L2
    if isinstance(attacks, str) or not attacks:
        raise TypeError(f"attacks must be a non-empty list of attack names, got {attacks!r}")
    names = list(attacks)
    for name in names:
        parse_attack(name, norm)
    if len(set(names)) != len(names):
        raise ValueError(f"attacks lists a name twice: {names}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    device = _device_of(model)
    autocast = autocast_dtype(precision, device)

    from tqdm.auto import tqdm

    n_batches = _n_batches(data, batch_size)
    bars = [tqdm(total=n_batches, desc=f"{name:>12}", unit="batch", position=index, disable=not progress,
                 leave=False) for index, name in enumerate(names)]
    correct_counts = dict.fromkeys(names, 0)
    seconds = dict.fromkeys(names, 0.0)
    worst_count = n_total = 0
    try:
        with attack_mode(model):
            input_dtype = model_dtype(model)

            def logits(inputs):
                with torch.no_grad():
                    return logits_fp32(model, inputs, autocast, input_dtype)

            for batch, (x, y) in enumerate(_batches(data, batch_size)):
                x, y = x.to(device), y.to(device)
                check_inputs(x, y)  # every batch: NaN, Inf, values outside [0, 1], label dtype and shape
                if batch == 0 and sanity_checks:
                    sanity_check(model, x, y, precision=precision, eps=eps, norm=norm, seed=seed or 0)
                start = time.perf_counter()
                clean_logits = logits(x)
                check_labels(y, clean_logits.shape[1])  # every batch, against the model's class count
                clean_correct = clean_logits.argmax(dim=1) == y
                attacked = clean_correct.nonzero().squeeze(1)
                clean_seconds = time.perf_counter() - start
                robust_to_all = clean_correct.clone()
                for index, name in enumerate(names):
                    start = time.perf_counter()
                    correct = clean_correct.clone()
                    if name != "clean" and len(attacked):
                        x_adv = run_attack(name, model, x[attacked], y[attacked], eps, norm=norm,
                                           precision=precision, seed=_attack_seed(seed, batch, index))
                        correct[attacked] = logits(x_adv).argmax(dim=1) == y[attacked]
                    correct_counts[name] += int(correct.sum())
                    seconds[name] += time.perf_counter() - start + (clean_seconds if name == "clean" else 0.0)
                    robust_to_all &= correct
                    bars[index].update(1)
                worst_count += int(robust_to_all.sum())
                n_total += len(y)
    finally:
        for bar in bars:
            bar.close()
    if n_total == 0:
        raise ValueError("data holds no samples")
    accuracy = {name: count / n_total for name, count in correct_counts.items()}
    accuracy["worst_case"] = worst_count / n_total
    return Evaluation(accuracy=accuracy, seconds=seconds, n_examples=n_total)


def evaluate(model, data, *, attacks=None, eps, norm="linf", batch_size=256, precision="fp32", seed=0,
             sanity_checks=True, progress=False):
    """Accuracy under each attack (threat model ``norm``, "linf" or "l2", radius ``eps`` > 0 on the [0, 1] scale)
    and the worst case over them.

    ``data``: an ``(x, y)`` pair of tensors (split into ``batch_size`` batches) or an iterable of ``(x, y)``
    batches; batches are moved to the model's device, and every batch is checked there (finite inputs in [0, 1],
    integer labels that are classes of the model). ``attacks``: names (see `parse_attack`): "clean", "fgsm"
    (L∞), "pgdN", "cwN" (N steps of size eps/4 from a random start, one restart; cross-entropy or CW margin
    loss), "autoattack" (standard), "autoattack-plus", "autoattack-rand", "autoattack:A+B" (a custom list).
    Default: DEFAULT_ATTACKS (L∞) or DEFAULT_ATTACKS_L2.

    A sample counts as robust to an attack when the model classifies both it and the attack's output
    correctly (misclassified samples are not attacked); "worst_case" counts the samples robust to every attack
    run, clean included. Returns ``{name: accuracy in [0, 1], ..., "worst_case": ...}``; `run_evaluation`
    also returns each attack's seconds.

    ``sanity_checks`` runs `sanity_check` on the first batch (warnings, see `EvaluationWarning`); ``progress``
    shows a tqdm bar per attack."""
    return run_evaluation(model, data, attacks=attacks, eps=eps, norm=norm, batch_size=batch_size,
                          precision=precision, seed=seed, sanity_checks=sanity_checks, progress=progress).accuracy
