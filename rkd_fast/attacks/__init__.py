"""Adversarial attacks and robust evaluation: fgsm, pgd, cw_linf, autoattack (through pyautoattack), evaluate.

Inputs in [0, 1], eps and alpha on that scale, models that return logits (normalisation inside the model);
``norm`` is "linf" or "l2" everywhere."""

from .attacks import cw_linf, fgsm, n_fgsm, pgd
from .autoattack import AutocastLogits, autoattack
from .evaluate import DEFAULT_ATTACKS, evaluate, parse_attack
from .sanity import (EvaluationWarning, GradientMaskingWarning, GradientMismatchWarning, ProbabilityOutputWarning,
                     RandomizedModelWarning, sanity_check)

__all__ = ["fgsm", "n_fgsm", "pgd", "cw_linf", "autoattack", "evaluate", "sanity_check", "AutocastLogits",
           "DEFAULT_ATTACKS", "parse_attack", "EvaluationWarning", "RandomizedModelWarning",
           "GradientMaskingWarning", "GradientMismatchWarning", "ProbabilityOutputWarning"]
