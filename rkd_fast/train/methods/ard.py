"""ard: Goldblum et al. 2020 (Adversarially Robust Distillation)."""

import torch
import torch.nn.functional as F

from ...attacks import pgd
from ...attacks.attacks import kl_per_sample
from ..options import Option
from .adversarial import Adversarial
from .base import register

# docs/baselines.md gives the sources
ARD_TEMPERATURE = 30.0  # official main.py --temp
ARD_ALPHA = 1.0  # official main.py --alpha: weight of the distillation term, (1 − α) on clean CE


@register
class ARD(Adversarial):
    """α·T²·KL(teacher(x)/T ‖ student(x')/T) + (1 − α)·CE(student(x), y), x' from PGD on the student's
    cross-entropy with the true labels (uniform random start). The KL is averaged over batch × classes, as the
    official code's nn.KLDivLoss() (mean reduction) does. The clean forward always runs (in train mode it updates
    the BatchNorm statistics, as in the official code), without a graph when α = 1."""

    name = "ard"
    baseline = True
    needs_teacher = True
    OPTIONS = (
        Option("ard_temperature", None, f"ard: distillation temperature (default: {ARD_TEMPERATURE})", strict=True),
        Option("ard_alpha", None, f"ard: weight of the distillation term, 1 - alpha on clean CE (default: {ARD_ALPHA})"),
    )
    DEFAULTS = {"ard_temperature": ARD_TEMPERATURE, "ard_alpha": ARD_ALPHA}

    @classmethod
    def check(cls, opt):
        if opt.ard_alpha > 1:
            raise ValueError(f"ard_alpha must be in [0, 1], got {opt.ard_alpha!r}")

    def forward(self, x, y, step_seed):
        x_adv = pgd(self.student, x, y, self.eps, self.alpha, self.run.attack_steps, norm="linf", loss="ce",
                    random_start=True, precision=self.run.precision, seed=step_seed)
        t, weight = self.opt.ard_temperature, self.opt.ard_alpha
        teacher_probs = F.softmax(self.teacher_logits(x) / t, dim=1)
        with self.autocast():
            logits_adv = self.student(x_adv)
            with torch.set_grad_enabled(torch.is_grad_enabled() and weight < 1):
                logits = self.student(x)
        # nn.KLDivLoss()'s mean over batch × classes (not F.kl_div's deprecated "mean", which is the same today)
        kd = kl_per_sample(logits_adv.float() / t, teacher_probs).mean() / teacher_probs.shape[1]
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.run.label_smoothing)
        total = weight * t * t * kd + (1.0 - weight) * ce  # ce carries no graph when α = 1
        return total, {"kd": kd.detach(), "ce": ce.detach(), "total": total.detach()}

    @classmethod
    def cost_units(cls, opt, attack_steps):
        # teacher on clean inputs, k attack steps against it, training passes on adversarial and clean inputs
        return {"T_f": 1, "S_fb": attack_steps + 2}
