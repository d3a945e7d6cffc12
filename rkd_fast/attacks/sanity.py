"""Checks that a white-box evaluation can be trusted, in the spirit of AutoAttack's (flags_doc.md there):
a randomised model, gradient masking, probabilities instead of logits, and a gradient that is not the loss's
(checked against finite differences and a few gradient-free queries). Each problem raises a warning of its own
`EvaluationWarning` subclass, so a caller can filter them or turn them into errors."""

import contextlib
import warnings

import torch
import torch.nn.functional as F

from ..precision import autocast_dtype
from ._common import attack_mode, check_inputs, check_labels, check_model, input_gradient, logits_fp32, model_dtype


class EvaluationWarning(UserWarning):
    """Base class: the robust accuracies measured on this model may overstate its robustness."""


class RandomizedModelWarning(EvaluationWarning):
    """Two clean forward passes in eval mode disagree: gradient attacks need EOT on a randomised model."""


class GradientMaskingWarning(EvaluationWarning):
    """Many samples have an exactly zero input gradient: gradient attacks cannot move them."""


class ProbabilityOutputWarning(EvaluationWarning):
    """The outputs look like probabilities (rows in [0, 1] summing to 1) rather than logits."""


class GradientMismatchWarning(EvaluationWarning):
    """The input gradient does not describe the loss: a finite difference of the loss along it disagrees with
    it, or a few random queries raise the loss more than a step along it (a backward pass that is not the
    forward's derivative: gradient attacks are misled, and their accuracy overstates robustness)."""


@contextlib.contextmanager
def collect_cautions():
    """Collects the sanity checks' warnings raised inside it (`EvaluationWarning`, each time it is raised) as
    "Name: message" strings into the list it yields, for a report to keep; any other warning is shown as usual."""
    cautions = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EvaluationWarning)
        yield cautions
    for warning in caught:
        if issubclass(warning.category, EvaluationWarning):
            cautions.append(f"{warning.category.__name__}: {warning.message}")
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


# The finite-difference check: central differences of step FD_STEP along sign(gradient), in fp32, on the samples
# where the change is large enough to measure (fp32 cross-entropies near 10 carry ~1e-6 absolute noise).
FD_STEP = 1e-3
FD_MEASURABLE = 1e-4  # |loss change| over the two steps below which a sample says nothing
FD_RTOL = 0.25  # agreement: |fd - autograd| <= FD_RTOL * max(|fd|, |autograd|)
RANDOM_QUERIES = 8  # random corners (L∞) or directions (L2) of the eps-ball tried per sample
QUERY_MEASURABLE = 1e-4  # loss change below which a sample's queries say nothing


def sanity_check(model, x, y, *, precision="fp32", zero_grad_fraction=0.05, rtol=1e-4, atol=1e-5, eps=None,
                 norm="linf", seed=0, mismatch_fraction=0.5):
    """Runs the checks on a batch and warns for each that fails; returns the names of those that failed:
    "randomized", "probabilities", "zero_gradients", "gradient_mismatch".

    ``zero_grad_fraction``: warn when more than this fraction of samples has an all-zero cross-entropy
    gradient with respect to the input (a model whose output does not depend on its input included).
    ``mismatch_fraction``: warn when more than this fraction of the samples that can tell has a gradient whose
    finite-difference estimate disagrees, or (with ``eps``, the attacks' radius under ``norm``) a random query of
    the eps-ball that raises the loss more than the step along the gradient."""
    check_model(model)
    check_inputs(x, y)
    autocast = autocast_dtype(precision, x.device)
    failed = []
    if x.shape[0] == 0:
        return failed
    x = x.detach().float()
    with attack_mode(model):
        input_dtype = model_dtype(model)
        with torch.no_grad():
            first = logits_fp32(model, x, autocast, input_dtype)
            second = logits_fp32(model, x, autocast, input_dtype)
        check_labels(y, first.shape[1])
        if not torch.allclose(first, second, rtol=rtol, atol=atol):
            failed.append("randomized")
            warnings.warn(RandomizedModelWarning(
                "two clean forward passes in eval mode give different outputs: the model looks randomised, "
                "and gradient attacks without expectation over transformation (EOT) overstate its robustness"),
                stacklevel=3)

        if (first.min() >= -atol and first.max() <= 1 + atol
                and torch.allclose(first.sum(dim=1), torch.ones_like(first[:, 0]), atol=1e-4)):
            failed.append("probabilities")
            warnings.warn(ProbabilityOutputWarning(
                "the model's outputs lie in [0, 1] and sum to 1: they look like probabilities; attacks expect "
                "logits (drop the final softmax), otherwise their losses saturate and robustness is overstated"),
                stacklevel=3)

        x_in = x.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(logits_fp32(model, x_in, autocast, input_dtype), y, reduction="sum")
            grad = input_gradient(loss, x_in)
        zero = grad.flatten(1).abs().sum(dim=1) == 0
        fraction = zero.float().mean().item()
        if fraction > zero_grad_fraction:
            failed.append("zero_gradients")
            constant = " (the outputs do not depend on the input at all)" if not loss.requires_grad else ""
            warnings.warn(GradientMaskingWarning(
                f"{zero.sum().item()} of {len(zero)} samples ({fraction:.0%}) have an all-zero input gradient"
                f"{constant}: gradient masking (or saturated outputs) makes gradient attacks unreliable; trust the "
                "gradient-free Square attack in AutoAttack and the CW-loss attacks more"), stacklevel=3)
        if "randomized" not in failed and not bool(zero.all()):
            problem = _gradient_mismatch(model, x, y, grad, ~zero, input_dtype, eps, norm, seed, mismatch_fraction)
            if problem:
                failed.append("gradient_mismatch")
                warnings.warn(GradientMismatchWarning(
                    f"{problem}: the input gradient the attacks follow is not the loss's (a backward pass that "
                    "differs from the forward, or a gradient that depends on whether the input requires grad); "
                    "gradient attacks overstate robustness here: trust gradient-free attacks (Square, in "
                    "AutoAttack standard)"), stacklevel=3)
    return failed


def _losses(model, x, y, input_dtype):
    with torch.no_grad():
        return F.cross_entropy(logits_fp32(model, x, None, input_dtype), y, reduction="none")


def _gradient_mismatch(model, x, y, grad, moving, input_dtype, eps, norm, seed, fraction):
    """What is wrong with the input gradient `grad` (of the summed cross-entropy at x) on the samples `moving`
    (those with a non-zero gradient), or None. Forward passes only, in fp32, without autograd: the loss the
    attacks climb, measured directly."""
    x, y, grad = x[moving], y[moving], grad[moving]
    direction = grad.sign()
    along = (grad * direction).flatten(1).sum(dim=1)  # autograd's derivative along the direction
    change = _losses(model, x + FD_STEP * direction, y, input_dtype) - \
        _losses(model, x - FD_STEP * direction, y, input_dtype)
    finite = change / (2 * FD_STEP)
    scale = torch.maximum(finite.abs(), along.abs())
    measurable = scale * 2 * FD_STEP > FD_MEASURABLE
    if measurable.any():
        disagree = ((finite - along).abs() > FD_RTOL * scale) & measurable
        share = disagree.sum().item() / measurable.sum().item()
        if share > fraction:
            return (f"on {disagree.sum().item()} of {measurable.sum().item()} samples a finite difference of the "
                    f"loss disagrees with its autograd derivative (median ratio "
                    f"{(finite[measurable] / along[measurable]).median().item():.2g})")
    if eps is None:
        return None
    # A step along the gradient against the best of a few random queries of the eps-ball.
    generator = torch.Generator(device=x.device).manual_seed(seed)
    if norm == "linf":
        step = eps * direction
        queries = [eps * torch.randint(0, 2, x.shape, generator=generator, device=x.device).mul(2).sub(1)
                   for _ in range(RANDOM_QUERIES)]
    else:
        unit = lambda t: t / t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (t.dim() - 1))  # noqa: E731
        step = eps * unit(grad)
        queries = [eps * unit(torch.randn(x.shape, generator=generator, device=x.device))
                   for _ in range(RANDOM_QUERIES)]
    base = _losses(model, x, y, input_dtype)
    gradient_step = _losses(model, (x + step).clamp(0, 1), y, input_dtype)
    best_random = torch.stack([_losses(model, (x + q.to(x.dtype)).clamp(0, 1), y, input_dtype)
                               for q in queries]).amax(dim=0)
    telling = (torch.maximum(gradient_step, best_random) - base).abs() > QUERY_MEASURABLE
    beaten = (best_random > gradient_step) & telling
    if telling.any() and beaten.sum().item() / telling.sum().item() > fraction:
        return (f"on {beaten.sum().item()} of {telling.sum().item()} samples one of {RANDOM_QUERIES} random queries "
                f"of the eps = {eps:g} ball raises the loss more than a step along the gradient")
    return None
