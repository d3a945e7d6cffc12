"""White-box gradient attacks: FGSM, PGD (L∞ / L2, cross-entropy or CW margin loss, restarts) and CW-L∞, and
N-FGSM, the training perturbation of the single-step method n-fgsm.

Conventions (as torchattacks and AutoAttack): inputs in [0, 1], eps and alpha on that scale, the model returns
logits with any normalisation inside it. Every attack returns the adversarial inputs with x's shape, dtype and
layout.

How they run: the whole batch at once; the forward pass optionally under autocast (``precision="bf16"`` or
``"fp16"``) while the perturbation, the logits and the loss stay fp32; 4-D inputs in channels_last; the model
in eval mode with its parameters frozen (``requires_grad`` False, so the backward reaches only the input and
no ``.grad`` is written), both restored afterwards; randomness from a local ``torch.Generator``."""

import torch
import torch.nn.functional as F

from .. import seeding

from ..checks import check_choice, check_count, check_number
from ..precision import autocast_dtype
from ._common import (LOSSES, NORMS, attack_mode, check_inputs, check_labels, check_model, input_gradient, like_input,
                      logits_fp32, make_generator, model_dtype, to_attack_layout)

_TINY = 1e-12  # keeps L2 normalisation finite for an all-zero gradient or perturbation


def attack_loss(logits, y, loss):
    """Per-sample loss the attacker maximises: cross-entropy, or the CW margin max_{j≠y} z_j − z_y."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.amax(dim=1) - true


def _input_grad(model, x_adv, y, loss, autocast, input_dtype, *, first=False):
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = logits_fp32(model, x_adv, autocast, input_dtype)
        if first:
            check_labels(y, logits.shape[1])
        per_sample = attack_loss(logits, y, loss)
        # Only the input is asked for: the frozen parameters get no gradient and nothing accumulates.
        grad = input_gradient(per_sample.sum(), x_adv)
    return grad


def _l2_per_sample(t):
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(x_adv, x0, eps, norm):
    """Back into the eps-ball around x0, then into the [0, 1] box."""
    delta = x_adv - x0
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _l2_per_sample(delta).clamp_min(_TINY)).clamp(max=1.0)
    return (x0 + delta).clamp(0.0, 1.0)


def _random_start(x0, eps, norm, generator):
    if norm == "linf":
        delta = seeding.uniform(x0.shape, -eps, eps, generator=generator, device=x0.device, dtype=x0.dtype)
    else:
        # A random direction and a radius uniform in [0, eps].
        direction = seeding.normal(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        direction = direction / _l2_per_sample(direction).clamp_min(_TINY)
        radius = seeding.uniform((x0.shape[0],), 0.0, 1.0, generator=generator, device=x0.device)
        delta = direction * (eps * radius).view(-1, *([1] * (x0.dim() - 1)))
    return (x0 + delta).clamp(0.0, 1.0)


def _ascent_step(grad, alpha, norm):
    if norm == "linf":
        return alpha * grad.sign()
    return alpha * grad / _l2_per_sample(grad).clamp_min(_TINY)


def fgsm(model, x, y, eps, *, precision="fp32"):
    """Fast gradient sign method (L∞): one step of size eps along the sign of the cross-entropy gradient."""
    check_model(model)
    check_inputs(x, y)
    eps = check_number("eps", eps)
    autocast = autocast_dtype(precision, x.device)
    if x.shape[0] == 0:
        return x.clone()
    x0 = to_attack_layout(x)
    with attack_mode(model):
        grad = _input_grad(model, x0, y, "ce", autocast, model_dtype(model), first=True)
        x_adv = (x0 + eps * grad.sign()).clamp(0.0, 1.0)
    return like_input(x_adv, x)


def n_fgsm(model, x, y, eps, *, alpha=None, noise=None, precision="fp32", seed=None, return_start=False):
    """N-FGSM (de Jorge et al. 2022), L∞: from x + η with η uniform in [−noise, noise] (default 2·eps), one
    signed-gradient step of ``alpha`` (default eps) on the cross-entropy, and no projection back onto the eps-ball
    (the point may lie up to noise + alpha from x); the noisy start and the result are clamped to the [0, 1] box.
    A training perturbation, not an evaluation attack: it is not confined to the threat model. ``seed`` seeds the
    noise (a local generator). ``return_start``: also return the noisy start, ``(start, x_adv)`` (robust-kd's
    finite difference runs from it)."""
    check_model(model)
    check_inputs(x, y)
    eps = check_number("eps", eps)
    alpha = eps if alpha is None else check_number("alpha", alpha)
    noise = 2.0 * eps if noise is None else check_number("noise", noise)
    autocast = autocast_dtype(precision, x.device)
    if x.shape[0] == 0:
        return (x.clone(), x.clone()) if return_start else x.clone()
    x0 = to_attack_layout(x)
    generator = make_generator(seed, x.device)
    with attack_mode(model):
        noise_draw = seeding.uniform(x0.shape, -noise, noise, generator=generator, device=x0.device, dtype=x0.dtype)
        start = (x0 + noise_draw).clamp(0.0, 1.0)
        grad = _input_grad(model, start, y, "ce", autocast, model_dtype(model), first=True)
        x_adv = (start + alpha * grad.sign()).clamp(0.0, 1.0)
    return (like_input(start, x), like_input(x_adv, x)) if return_start else like_input(x_adv, x)


def pgd(model, x, y, eps, alpha, steps, *, norm="linf", loss="ce", random_start=True, restarts=1,
        precision="fp32", seed=None):
    """Projected gradient descent (Madry et al.), untargeted.

    Each restart takes ``steps`` steps of size ``alpha`` (the gradient's sign for L∞, the gradient scaled to
    unit L2 norm for L2) on ``loss`` ("ce" cross-entropy or "cw" margin), projecting onto the eps-ball and
    [0, 1] after each; a restart starts from a random point of the ball when ``random_start``. The result of
    a restart is its last iterate. Across restarts each sample keeps the first adversarial that fools the
    model, or, while none has, the one with the highest loss. ``seed`` makes the random starts reproducible
    (a local generator; the global RNG is untouched)."""
    check_model(model)
    check_inputs(x, y)
    eps = check_number("eps", eps)
    alpha = check_number("alpha", alpha, strict=True)
    steps = check_count("steps", steps)
    restarts = check_count("restarts", restarts)
    check_choice("norm", norm, NORMS)
    check_choice("loss", loss, LOSSES)
    if not isinstance(random_start, bool):
        raise TypeError(f"random_start must be a bool, got {type(random_start).__name__}")
    if restarts > 1 and not random_start:
        raise ValueError("restarts > 1 needs random_start=True: without it every restart is the same")
    autocast = autocast_dtype(precision, x.device)
    generator = make_generator(seed, x.device) if random_start else None
    if x.shape[0] == 0:
        return x.clone()

    x0 = to_attack_layout(x)
    with attack_mode(model):
        input_dtype = model_dtype(model)
        best = x0
        best_loss = torch.full((x0.shape[0],), float("-inf"), device=x0.device)
        best_fooled = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
        for restart in range(restarts):
            x_adv = _random_start(x0, eps, norm, generator) if random_start else x0
            for step in range(steps):
                grad = _input_grad(model, x_adv, y, loss, autocast, input_dtype,
                                   first=restart == 0 and step == 0)
                x_adv = _project(x_adv + _ascent_step(grad, alpha, norm), x0, eps, norm)
            if restarts == 1:
                best = x_adv  # nothing to choose between: skip the extra forward pass
                break
            with torch.no_grad():
                logits = logits_fp32(model, x_adv, autocast, input_dtype)
                loss_now = attack_loss(logits, y, loss)
                fooled = logits.argmax(dim=1) != y
            # A sample already fooled keeps its first adversarial; otherwise a new one wins when it fools
            # the model or raises the loss.
            take = ~best_fooled & (fooled | (loss_now > best_loss))
            best = torch.where(take.view(-1, *([1] * (x0.dim() - 1))), x_adv, best)
            best_loss = torch.where(take, loss_now, best_loss)
            best_fooled |= fooled
            if bool(best_fooled.all()):
                break
    return like_input(best, x)


# TRADES and RSLAD start their inner maximisation at x + START_SIGMA · N(0, I) (both official codes).
START_SIGMA = 0.001


def kl_per_sample(logits, target_probs):
    """KL(target ‖ softmax(logits)) of each sample, summed over classes, in fp32. Differentiable in both
    (TRADES backpropagates through its target, the clean prediction)."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), target_probs.float(), reduction="none").sum(dim=1)


def kl_attack(model, x, target_probs, eps, alpha, steps, *, precision="fp32", seed=None):
    """The inner maximisation of TRADES and RSLAD: L∞ PGD on Σ_i KL(target_i ‖ softmax(model(x'_i))) from
    x + 0.001·N(0, I) (no random start in the ball), ``steps`` signed-gradient steps of size ``alpha``, each
    projected onto the eps-ball around x and [0, 1] (the official codes' loop). ``target_probs`` is fixed
    (detached): the model's own clean prediction for TRADES, the teacher's for RSLAD. The model runs in eval
    mode with frozen parameters; the noise comes from a generator seeded with ``seed``."""
    generator = make_generator(seed, x.device)
    autocast = autocast_dtype(precision, x.device)
    x0 = to_attack_layout(x)
    target = target_probs.detach().float()
    with attack_mode(model):
        input_dtype = model_dtype(model)
        x_adv = x0 + START_SIGMA * seeding.normal(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                objective = kl_per_sample(logits_fp32(model, x_adv, autocast, input_dtype), target).sum()
                grad = input_gradient(objective, x_adv)
            x_adv = _project(x_adv.detach() + alpha * grad.sign(), x0, eps, "linf")
    return like_input(x_adv.detach(), x)


def cw_linf(model, x, y, eps, alpha, steps, **pgd_options):
    """CW-L∞: PGD in the L∞ ball on the Carlini–Wagner margin loss max_{j≠y} z_j − z_y.

    ``pgd_options`` are pgd's keyword options (random_start, restarts, precision, seed); norm and loss are
    fixed here."""
    for fixed in ("norm", "loss"):
        if fixed in pgd_options:
            raise TypeError(f"cw_linf() fixes {fixed}; got {fixed}={pgd_options[fixed]!r}")
    return pgd(model, x, y, eps, alpha, steps, norm="linf", loss="cw", **pgd_options)
