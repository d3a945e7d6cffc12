"""Checks that a white-box evaluation can be trusted, in the spirit of AutoAttack's (flags_doc.md there):
a randomised model, gradient masking, probabilities instead of logits. Each problem raises a warning of its own
`EvaluationWarning` subclass, so a caller can filter them or turn them into errors."""

import warnings

import torch
import torch.nn.functional as F

from ._common import attack_mode, autocast_dtype, check_inputs, check_labels, check_model, logits_fp32, model_dtype


class EvaluationWarning(UserWarning):
    """Base class: the robust accuracies measured on this model may overstate its robustness."""


class RandomizedModelWarning(EvaluationWarning):
    """Two clean forward passes in eval mode disagree: gradient attacks need EOT on a randomised model."""


class GradientMaskingWarning(EvaluationWarning):
    """Many samples have an exactly zero input gradient: gradient attacks cannot move them."""


class ProbabilityOutputWarning(EvaluationWarning):
    """The outputs look like probabilities (rows in [0, 1] summing to 1) rather than logits."""


def sanity_check(model, x, y, *, precision="fp32", zero_grad_fraction=0.05, rtol=1e-4, atol=1e-5):
    """Runs the three checks on a batch and warns for each that fails; returns the names of those that failed.

    ``zero_grad_fraction``: warn when more than this fraction of samples has an all-zero cross-entropy
    gradient with respect to the input."""
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
            (grad,) = torch.autograd.grad(loss, x_in)
        zero = grad.flatten(1).abs().sum(dim=1) == 0
        fraction = zero.float().mean().item()
        if fraction > zero_grad_fraction:
            failed.append("zero_gradients")
            warnings.warn(GradientMaskingWarning(
                f"{zero.sum().item()} of {len(zero)} samples ({fraction:.0%}) have an all-zero input gradient: "
                "gradient masking (or saturated outputs) makes gradient attacks unreliable; trust the "
                "gradient-free Square attack in AutoAttack and the CW-loss attacks more"), stacklevel=3)
    return failed
