"""Training methods: each computes one step's loss and its terms from a batch.

A method is built once per run with ``Method(student, teacher, cfg, info, example_input, autocast)`` and
called as ``total, terms = method(x, y, step_seed)``: ``total`` a 0-d float32 tensor to backpropagate,
``terms`` a dict of detached 0-d tensors (no host sync). ``autocast()`` returns the context the forward
passes run in (the run's mixed precision). ``step_seed`` seeds any randomness of the step that does not
come from the global RNG (the PGD random start), so a resumed run replays it. A method's own trainable
parameters (the feature adapters) are ``method.parameters()`` and its state is ``method.state_dict()``.
"""

import torch.nn.functional as F
from torch import nn

from ..losses import RobustKDLoss
from .config import DEFAULT_FEATURE_LAYER


class Method(nn.Module):
    """Base: holds the student and teacher by reference (not as submodules), like RobustKDLoss."""

    def __init__(self, student, teacher, cfg, info, example_input, autocast):
        super().__init__()
        self._models = (student, teacher)
        self.cfg = cfg
        self.info = info
        self.autocast = autocast

    @property
    def student(self):
        return self._models[0]


class Natural(Method):
    """Standard training: cross-entropy on clean inputs."""

    def forward(self, x, y, step_seed):
        with self.autocast():
            logits = self.student(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        return loss, {"ce": loss.detach(), "total": loss.detach()}


class PGDAT(Method):
    """Madry et al.'s adversarial training: cross-entropy on PGD adversarial examples (L∞, eps, alpha,
    attack_steps steps, random start). The attack runs with the model in eval mode (rkd_fast.attacks.pgd
    does so), so the attack's forward passes do not move the BatchNorm statistics."""

    def __init__(self, student, teacher, cfg, info, example_input, autocast):
        super().__init__(student, teacher, cfg, info, example_input, autocast)
        self.eps = cfg.eps if cfg.eps is not None else info.eps
        self.alpha = cfg.alpha if cfg.alpha is not None else self.eps / 4

    def forward(self, x, y, step_seed):
        from ..attacks import pgd

        x_adv = pgd(self.student, x, y, self.eps, self.alpha, self.cfg.attack_steps, norm="linf",
                    random_start=True, precision=self.cfg.precision, seed=step_seed)
        with self.autocast():
            logits = self.student(x_adv)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        return loss, {"adv_ce": loss.detach(), "total": loss.detach()}


class _Distill(Method):
    """kd and robust-kd: a RobustKDLoss with the method's weights."""

    def loss_options(self, cfg):
        raise NotImplementedError

    def __init__(self, student, teacher, cfg, info, example_input, autocast):
        super().__init__(student, teacher, cfg, info, example_input, autocast)
        self.loss_fn = RobustKDLoss(student, teacher, example_input=example_input,
                                    label_smoothing=cfg.label_smoothing, kd_temperature=cfg.kd_temperature,
                                    **self.loss_options(cfg))

    def forward(self, x, y, step_seed):
        with self.autocast():
            return self.loss_fn(x, y)


class KD(_Distill):
    """Hinton et al.'s knowledge distillation: ce_weight · CE + kd_weight · T² · KL at temperature T."""

    def loss_options(self, cfg):
        return {"ce_weight": cfg.ce_weight, "kd_weight": cfg.kd_weight, "feat_weight": 0.0, "jac_weight": 0.0}


class RobustKD(_Distill):
    """Robust knowledge distillation: CE + KD + feature-map matching + finite-difference Jacobian matching."""

    def loss_options(self, cfg):
        pairs = cfg.pairs()
        if not pairs and cfg.feat_weight > 0:
            s_layer = DEFAULT_FEATURE_LAYER.get(cfg.arch)
            teacher_arch = getattr(self._models[1], "rkd_arch", None) or cfg.teacher_arch or cfg.arch
            t_layer = DEFAULT_FEATURE_LAYER.get(teacher_arch)
            if s_layer is None or t_layer is None:
                raise ValueError(f"no default feature layer for {cfg.arch!r}: give --feature-pair "
                                 "STUDENT_LAYER:TEACHER_LAYER (or --feat-weight 0)")
            pairs = [(s_layer, t_layer)]
        jacobian = {"direction": cfg.jac_direction, "norm": cfg.jac_norm, "on": cfg.jac_on,
                    "temperature": cfg.jac_temperature, "fraction": cfg.jac_fraction}
        if cfg.jac_h is not None:
            jacobian["h"] = cfg.jac_h
        return {"ce_weight": cfg.ce_weight, "kd_weight": cfg.kd_weight, "feat_weight": cfg.feat_weight,
                "jac_weight": cfg.jac_weight, "feature_pairs": pairs, "feature_mode": cfg.feature_mode,
                "jacobian": jacobian}


METHODS = {"natural": Natural, "kd": KD, "robust-kd": RobustKD, "pgd-at": PGDAT}


def build_method(cfg, student, teacher, info, example_input, autocast):
    return METHODS[cfg.method](student, teacher, cfg, info, example_input, autocast)
