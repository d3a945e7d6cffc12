"""The learning-rate schedules, advanced every optimizer step."""

import math


def lr_lambda(cfg, steps_per_epoch):
    """The learning-rate factor as a function of the optimizer step (schedules advance every step)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if cfg.schedule == "multistep":
        epochs = cfg.milestones or tuple(e for e in (cfg.epochs // 2, cfg.epochs * 3 // 4) if e > 0)
        bounds = sorted(e * steps_per_epoch for e in epochs)
        return lambda step: cfg.gamma ** sum(step >= b for b in bounds)
    return lambda step: 1.0
