"""trades: Zhang et al. 2019 (TRADES), the student against its own clean prediction."""

import torch
import torch.nn.functional as F

from ...attacks._common import attack_mode
from ...attacks.attacks import kl_per_sample
from ..options import Option
from .adversarial import Adversarial
from .base import register

TRADES_BETA = 6.0  # Zhang et al. 2019, CIFAR-10 (1/λ); docs/baselines.md


@register
class TRADES(Adversarial):
    """CE(f(x), y) + β · mean_i KL(p(x_i) ‖ p(x'_i)), x' from `kl_attack` on the student's own clean prediction
    p(x) (computed in eval mode, fixed during the attack). The outer KL backpropagates through both p(x) and
    p(x'), as the official trades_loss does. No teacher: this is also the method that trains robust teachers."""

    name = "trades"
    baseline = True
    OPTIONS = (Option("trades_beta", None, f"trades: weight of the KL robustness term (default: {TRADES_BETA})"),)
    DEFAULTS = {"trades_beta": TRADES_BETA}

    def forward(self, x, y, step_seed):
        student = self.student
        with torch.no_grad(), attack_mode(student), self.autocast():
            clean_probs = F.softmax(student(x).float(), dim=1)
        x_adv = self.kl_attack(x, clean_probs, step_seed)
        with self.autocast():
            logits = student(x)
            logits_adv = student(x_adv)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.run.label_smoothing)
        robust = kl_per_sample(logits_adv, F.softmax(logits.float(), dim=1)).mean()
        total = ce + self.opt.trades_beta * robust
        return total, {"ce": ce.detach(), "kl_adv": robust.detach(), "total": total.detach()}

    @classmethod
    def cost_units(cls, opt, attack_steps):
        # clean target (no graph), k attack steps, training passes on clean and adversarial inputs
        return {"S_f": 1, "S_fb": attack_steps + 2}
