"""natural: standard training, cross-entropy on clean inputs."""

import torch.nn.functional as F

from .base import Method, register


@register
class Natural(Method):
    name = "natural"
    in_study = False  # no robustness to weigh against its cost (the demo shows it)

    def forward(self, x, y, step_seed):
        with self.autocast():
            logits = self.student(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.run.label_smoothing)
        return loss, {"ce": loss.detach(), "total": loss.detach()}

    @classmethod
    def cost_units(cls, opt, attack_steps):
        return {"S_fb": 1}
