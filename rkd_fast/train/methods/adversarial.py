"""Adversarial training: the student trained on its own adversarial examples. pgd-at (Madry et al.), and the
single-step methods fgsm-rs (Wong et al. 2020), n-fgsm (de Jorge et al. 2022) and free-at (Shafahi et al. 2019);
and the base of every method that attacks the student during training (trades, ard, rslad)."""

import torch
import torch.nn.functional as F

from ...attacks import n_fgsm, pgd
from ...attacks.attacks import kl_attack
from ..options import Option
from .base import Method, register

FGSM_RS_ALPHA = 1.25  # Wong et al. 2020: step 1.25·eps from a uniform start in the eps-ball
N_FGSM_NOISE = 2.0  # de Jorge et al. 2022: noise uniform in [−2·eps, 2·eps], step eps, no projection
FREE_AT_REPLAYS = 8  # Shafahi et al. 2019: m = 8 replays of each minibatch on CIFAR (4 on ImageNet)


class Adversarial(Method):
    """Base of the methods that attack the student during training: the attack's eps and alpha (default
    `alpha_of_eps` · eps: eps / 4 unless a subclass gives its own). Every attack runs with the student in eval
    mode and its parameters frozen (rkd_fast.attacks' attack_mode), so its forward passes do not move the
    BatchNorm statistics; a teacher runs in eval mode under no_grad."""

    def __init__(self, student, teacher, run, opt, example_input, autocast):
        super().__init__(student, teacher, run, opt, example_input, autocast)
        self.eps, self.alpha = run.eps, run.alpha

    def teacher_logits(self, x):
        with torch.no_grad(), self.autocast():
            return self.teacher(x).float()

    def kl_attack(self, x, target_probs, step_seed):
        return kl_attack(self.student, x, target_probs, self.eps, self.alpha, self.run.attack_steps,
                         precision=self.run.precision, seed=step_seed)

    def adversarial_ce(self, x_adv, y):
        """The training loss of the adversarial-training methods: cross-entropy of the student on x_adv."""
        with self.autocast():
            logits = self.student(x_adv)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.run.label_smoothing)
        return loss, {"adv_ce": loss.detach(), "total": loss.detach()}


@register
class PGDAT(Adversarial):
    """Madry et al.'s adversarial training: cross-entropy on PGD adversarial examples (L∞, eps, alpha,
    attack_steps steps, random start)."""

    name = "pgd-at"
    # PGD-AT with two steps of eps/2: the cheapest multi-step attack
    STUDY_VARIANTS = {"pgd-2": {"attack_steps": 2, "alpha_eps": 0.5}}

    def attack_steps(self):
        return self.run.attack_steps

    def forward(self, x, y, step_seed):
        x_adv = pgd(self.student, x, y, self.eps, self.alpha, self.attack_steps(), norm="linf", random_start=True,
                    precision=self.run.precision, seed=step_seed)
        return self.adversarial_ce(x_adv, y)

    @classmethod
    def cost_units(cls, opt, attack_steps):
        return {"S_fb": attack_steps + 1}  # k attack steps (forward + input backward), then the training pass


@register
class FGSMRS(PGDAT):
    """Wong, Rice & Kolter 2020 ("Fast is better than free"), FGSM with a random start: from a point uniform in
    the eps-ball, one signed-gradient step of alpha (default FGSM_RS_ALPHA · eps), projected back onto the ball
    and [0, 1]; cross-entropy on the result. PGD-AT with one step (`pgd` with steps=1)."""

    name = "fgsm-rs"
    baseline = True
    alpha_of_eps = FGSM_RS_ALPHA

    def attack_steps(self):
        return 1

    @classmethod
    def cost_units(cls, opt, attack_steps):
        return {"S_fb": 2}  # one attack step and the training pass


@register
class NFGSM(Adversarial):
    """de Jorge et al. 2022 (N-FGSM, "Make some noise"): from x plus noise uniform in [−N_FGSM_NOISE·eps,
    N_FGSM_NOISE·eps], one signed-gradient step of alpha (default eps), not projected back onto the eps-ball
    (`rkd_fast.attacks.n_fgsm`); cross-entropy on the result."""

    name = "n-fgsm"
    baseline = True
    alpha_of_eps = 1.0

    def forward(self, x, y, step_seed):
        x_adv = n_fgsm(self.student, x, y, self.eps, alpha=self.alpha, noise=N_FGSM_NOISE * self.eps,
                       precision=self.run.precision, seed=step_seed)
        return self.adversarial_ce(x_adv, y)

    @classmethod
    def cost_units(cls, opt, attack_steps):
        return {"S_fb": 2}


@register
class FreeAT(Adversarial):
    """Shafahi et al. 2019 ("Adversarial training for free!"): each minibatch is replayed for `replays` (m)
    consecutive optimizer steps, and one backward pass per step gives both the weights' gradient and the input's,
    which moves the perturbation δ by eps along its sign, clipped to the eps-ball; δ carries over to the next
    step and the next minibatch (the official code's global noise tensor). Cross-entropy of the student on
    clamp(x + δ, 0, 1), in train mode (the attack is the training pass). Give --epochs divided by m to spend
    what the other methods spend. δ is method state (in checkpoints); under torchrun each process keeps its own."""

    name = "free-at"
    baseline = True
    alpha_of_eps = 1.0  # the official fgsm_step = clip_eps
    OPTIONS = (Option("free_replays", FREE_AT_REPLAYS, type=int, minimum=1, metavar="M",
                      help="free-at: optimizer steps per minibatch (default: %(default)s, Shafahi et al.'s CIFAR "
                           "value); divide --epochs by M to match the other methods' cost"),)

    def __init__(self, student, teacher, run, opt, example_input, autocast):
        super().__init__(student, teacher, run, opt, example_input, autocast)
        self.replays = opt.free_replays  # the trainer's optimizer steps per batch
        self.delta = torch.zeros((run.batch_size, *example_input.shape[1:]), device=example_input.device)

    def get_extra_state(self):  # in state_dict (checkpoints) but not a buffer: DDP must not broadcast it
        return {"delta": self.delta}

    def set_extra_state(self, state):
        self.delta = state["delta"].to(self.delta.device)

    def forward(self, x, y, step_seed):
        n = x.shape[0]
        noise = self.delta[:n].clone().requires_grad_()

        def move(grad):  # in this step's backward, from the gradient the weights' update uses too
            with torch.no_grad():
                step = self.alpha * torch.nan_to_num(grad).sign()
                self.delta[:n] = (self.delta[:n] + step).clamp_(-self.eps, self.eps)

        noise.register_hook(move)
        return self.adversarial_ce((x + noise).clamp(0.0, 1.0), y)

    @classmethod
    def cost_units(cls, opt, attack_steps):
        # one training pass whose backward also moves the carried perturbation (m replays of a minibatch are m
        # such optimizer steps)
        return {"S_fb": 1}
