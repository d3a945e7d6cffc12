"""Training methods: each computes one step's loss and its terms from a batch.

A method is built once per run with ``Method(student, teacher, cfg, info, example_input, autocast)`` and
called as ``total, terms = method(x, y, step_seed)``: ``total`` a 0-d float32 tensor to backpropagate,
``terms`` a dict of detached 0-d tensors (no host sync). ``autocast()`` returns the context the forward
passes run in (the run's mixed precision). ``step_seed`` seeds any randomness of the step that does not
come from the global RNG (the PGD random start), so a resumed run replays it. A method's own trainable
parameters (the feature adapters) are ``method.parameters()`` and its state is ``method.state_dict()``.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks._common import attack_mode
from ..attacks.attacks import kl_attack, kl_per_sample
from ..losses import RobustKDLoss
from .config import ARD_ALPHA, ARD_TEMPERATURE, DEFAULT_FEATURE_LAYER, FGSM_RS_ALPHA, N_FGSM_NOISE, TRADES_BETA

# RSLAD's official loss averages its KL terms over batch × classes on CIFAR-10 and multiplies by 10 on
# CIFAR-100 (README) to keep that scale: per-sample KL (summed over classes), batch mean, divided by 10.
RSLAD_KL_DIVISOR = 10.0
RSLAD_ADV_WEIGHT = 5.0 / 6.0  # and 1 − this on the clean term (Zi et al. 2021, Eq. 5)


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


class _Adversarial(Method):
    """Base of the methods that attack the student during training: the attack's eps (None: the data set's)
    and alpha (None: eps / 4). Every attack runs with the student in eval mode and its parameters frozen
    (rkd_fast.attacks' attack_mode), so its forward passes do not move the BatchNorm statistics; a teacher
    runs in eval mode under no_grad."""

    def __init__(self, student, teacher, cfg, info, example_input, autocast):
        super().__init__(student, teacher, cfg, info, example_input, autocast)
        self.eps = cfg.eps if cfg.eps is not None else info.eps
        self.alpha = cfg.alpha if cfg.alpha is not None else self.eps / 4
        if teacher is not None:
            teacher.eval()

    @property
    def teacher(self):
        return self._models[1]

    def teacher_logits(self, x):
        with torch.no_grad(), self.autocast():
            return self.teacher(x).float()

    def kl_attack(self, x, target_probs, step_seed):
        return kl_attack(self.student, x, target_probs, self.eps, self.alpha, self.cfg.attack_steps,
                         precision=self.cfg.precision, seed=step_seed)


class PGDAT(_Adversarial):
    """Madry et al.'s adversarial training: cross-entropy on PGD adversarial examples (L∞, eps, alpha,
    attack_steps steps, random start)."""

    def __init__(self, student, teacher, cfg, info, example_input, autocast):
        super().__init__(student, teacher, cfg, info, example_input, autocast)
        self.steps = cfg.attack_steps

    def forward(self, x, y, step_seed):
        from ..attacks import pgd

        x_adv = pgd(self.student, x, y, self.eps, self.alpha, self.steps, norm="linf", random_start=True,
                    precision=self.cfg.precision, seed=step_seed)
        return _adversarial_ce(self, x_adv, y)


def _adversarial_ce(method, x_adv, y):
    """The training loss of the adversarial-training methods: cross-entropy of the student on x_adv."""
    with method.autocast():
        logits = method.student(x_adv)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=method.cfg.label_smoothing)
    return loss, {"adv_ce": loss.detach(), "total": loss.detach()}


class FGSMRS(PGDAT):
    """Wong, Rice & Kolter 2020 ("Fast is better than free"), FGSM with a random start: from a point uniform in
    the eps-ball, one signed-gradient step of alpha (default FGSM_RS_ALPHA · eps), projected back onto the ball
    and [0, 1]; cross-entropy on the result. PGD-AT with one step (`pgd` with steps=1)."""

    def __init__(self, student, teacher, cfg, info, example_input, autocast):
        super().__init__(student, teacher, cfg, info, example_input, autocast)
        self.alpha = cfg.alpha if cfg.alpha is not None else FGSM_RS_ALPHA * self.eps
        self.steps = 1


class NFGSM(_Adversarial):
    """de Jorge et al. 2022 (N-FGSM, "Make some noise"): from x plus noise uniform in [−N_FGSM_NOISE·eps,
    N_FGSM_NOISE·eps], one signed-gradient step of alpha (default eps), not projected back onto the eps-ball
    (`rkd_fast.attacks.n_fgsm`); cross-entropy on the result."""

    def __init__(self, student, teacher, cfg, info, example_input, autocast):
        super().__init__(student, teacher, cfg, info, example_input, autocast)
        self.alpha = cfg.alpha if cfg.alpha is not None else self.eps

    def forward(self, x, y, step_seed):
        from ..attacks import n_fgsm

        x_adv = n_fgsm(self.student, x, y, self.eps, alpha=self.alpha, noise=N_FGSM_NOISE * self.eps,
                       precision=self.cfg.precision, seed=step_seed)
        return _adversarial_ce(self, x_adv, y)


def step_in_threat_units(kappa, eps, norm, input_shape):
    """The finite-difference step h = κ·eps for an L∞ (sign) direction, κ·eps·sqrt(D) for a unit L2 direction (D
    values per sample): the same fraction of the threat model's radius whatever the input size (8×8 digits: D = 64;
    CIFAR: 3,072; ImageNet: 150,528)."""
    d = math.prod(input_shape[1:])
    return kappa * eps * (math.sqrt(d) if norm == "l2" else 1.0)


class FreeAT(_Adversarial):
    """Shafahi et al. 2019 ("Adversarial training for free!"): each minibatch is replayed for `replays` (m)
    consecutive optimizer steps, and one backward pass per step gives both the weights' gradient and the input's,
    which moves the perturbation δ by eps along its sign, clipped to the eps-ball; δ carries over to the next
    step and the next minibatch (the official code's global noise tensor). Cross-entropy of the student on
    clamp(x + δ, 0, 1), in train mode (the attack is the training pass). Give --epochs divided by m to spend
    what the other methods spend. δ is method state (in checkpoints); under torchrun each process keeps its own."""

    def __init__(self, student, teacher, cfg, info, example_input, autocast):
        super().__init__(student, teacher, cfg, info, example_input, autocast)
        self.replays = cfg.free_replays
        self.step_size = cfg.alpha if cfg.alpha is not None else self.eps  # the official fgsm_step = clip_eps
        self.delta = torch.zeros((cfg.batch_size, *example_input.shape[1:]), device=example_input.device)

    def get_extra_state(self):  # in state_dict (checkpoints) but not a buffer: DDP must not broadcast it
        return {"delta": self.delta}

    def set_extra_state(self, state):
        self.delta = state["delta"].to(self.delta.device)

    def forward(self, x, y, step_seed):
        n = x.shape[0]
        noise = self.delta[:n].clone().requires_grad_()

        def move(grad):  # in this step's backward, from the gradient the weights' update uses too
            with torch.no_grad():
                step = self.step_size * torch.nan_to_num(grad).sign()
                self.delta[:n] = (self.delta[:n] + step).clamp_(-self.eps, self.eps)

        noise.register_hook(move)
        return _adversarial_ce(self, (x + noise).clamp(0.0, 1.0), y)


class _Distill(Method):
    """kd and robust-kd: a RobustKDLoss with the method's weights."""

    def loss_options(self, cfg):
        raise NotImplementedError

    def __init__(self, student, teacher, cfg, info, example_input, autocast):
        super().__init__(student, teacher, cfg, info, example_input, autocast)
        self.example_shape = tuple(example_input.shape)
        self.loss_fn = RobustKDLoss(student, teacher, example_input=example_input,
                                    label_smoothing=cfg.label_smoothing, kd_temperature=cfg.kd_temperature,
                                    **self.loss_options(cfg))

    def forward(self, x, y, step_seed):
        with self.autocast():
            return self.loss_fn(x, y, seed=step_seed)


class KD(_Distill):
    """Hinton et al.'s knowledge distillation: ce_weight · CE + kd_weight · T² · KL at temperature T."""

    def loss_options(self, cfg):
        return {"ce_weight": cfg.ce_weight, "kd_weight": cfg.kd_weight, "feat_weight": 0.0, "jac_weight": 0.0}


class RobustKD(_Distill):
    """Robust knowledge distillation: CE + KD + feature-map matching + finite-difference Jacobian matching, at the
    student's single-step adversarial point (distill_at="adversarial", the default) or at the clean input
    (distill_at="clean"); see rkd_fast.losses."""

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
        eps = cfg.eps if cfg.eps is not None else self.info.eps
        options = {"ce_weight": cfg.ce_weight, "kd_weight": cfg.kd_weight, "feat_weight": cfg.feat_weight,
                   "jac_weight": cfg.jac_weight, "feature_pairs": pairs, "feature_mode": cfg.feature_mode}
        if cfg.distill_at == "adversarial":
            h = cfg.jac_h if cfg.jac_h is not None else cfg.jac_step * eps
            return {**options, "eps": eps, "noise": cfg.adv_noise,
                    "jacobian": {"h": h, "on": cfg.jac_on, "temperature": cfg.jac_temperature}}
        h = cfg.jac_h if cfg.jac_h is not None else step_in_threat_units(cfg.jac_step, eps, cfg.jac_norm,
                                                                          self.example_shape)
        return {**options, "jacobian": {"h": h, "direction": cfg.jac_direction, "norm": cfg.jac_norm,
                                        "on": cfg.jac_on, "temperature": cfg.jac_temperature,
                                        "fraction": cfg.jac_fraction}}


class TRADES(_Adversarial):
    """Zhang et al. 2019 (TRADES): CE(f(x), y) + β · mean_i KL(p(x_i) ‖ p(x'_i)), x' from `kl_attack` on the
    student's own clean prediction p(x) (computed in eval mode, fixed during the attack). The outer KL
    backpropagates through both p(x) and p(x'), as the official trades_loss does. No teacher: this is also
    the method that trains robust teachers."""

    def __init__(self, student, teacher, cfg, info, example_input, autocast):
        super().__init__(student, teacher, cfg, info, example_input, autocast)
        self.beta = TRADES_BETA if cfg.trades_beta is None else cfg.trades_beta

    def forward(self, x, y, step_seed):
        student = self.student
        with torch.no_grad(), attack_mode(student), self.autocast():
            clean_probs = F.softmax(student(x).float(), dim=1)
        x_adv = self.kl_attack(x, clean_probs, step_seed)
        with self.autocast():
            logits = student(x)
            logits_adv = student(x_adv)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        robust = kl_per_sample(logits_adv, F.softmax(logits.float(), dim=1)).mean()
        total = ce + self.beta * robust
        return total, {"ce": ce.detach(), "kl_adv": robust.detach(), "total": total.detach()}


class ARD(_Adversarial):
    """Goldblum et al. 2020 (ARD): α·T²·KL(teacher(x)/T ‖ student(x')/T) + (1 − α)·CE(student(x), y), x' from
    PGD on the student's cross-entropy with the true labels (uniform random start). The KL is averaged over
    batch × classes, as the official code's nn.KLDivLoss() (mean reduction) does. The clean forward always
    runs (in train mode it updates the BatchNorm statistics, as in the official code), without a graph when
    α = 1."""

    def __init__(self, student, teacher, cfg, info, example_input, autocast):
        super().__init__(student, teacher, cfg, info, example_input, autocast)
        self.temperature = ARD_TEMPERATURE if cfg.ard_temperature is None else cfg.ard_temperature
        self.weight = ARD_ALPHA if cfg.ard_alpha is None else cfg.ard_alpha

    def forward(self, x, y, step_seed):
        from ..attacks import pgd

        x_adv = pgd(self.student, x, y, self.eps, self.alpha, self.cfg.attack_steps, norm="linf", loss="ce",
                    random_start=True, precision=self.cfg.precision, seed=step_seed)
        t = self.temperature
        teacher_probs = F.softmax(self.teacher_logits(x) / t, dim=1)
        with self.autocast():
            logits_adv = self.student(x_adv)
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.weight < 1):
                logits = self.student(x)
        # nn.KLDivLoss()'s mean over batch × classes (not F.kl_div's deprecated "mean", which is the same today)
        kd = kl_per_sample(logits_adv.float() / t, teacher_probs).mean() / teacher_probs.shape[1]
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        total = self.weight * t * t * kd + (1.0 - self.weight) * ce  # ce carries no graph when α = 1
        return total, {"kd": kd.detach(), "ce": ce.detach(), "total": total.detach()}


class RSLAD(_Adversarial):
    """Zi et al. 2021 (RSLAD): (5/6 · KL(t(x) ‖ s(x')) + 1/6 · KL(t(x) ‖ s(x))) / 10 at temperature 1, with the
    teacher's clean soft labels t(x) as the target of both terms and of the inner maximisation (`kl_attack`).
    The / 10 reproduces the official code's scale (RSLAD_KL_DIVISOR)."""

    def forward(self, x, y, step_seed):
        teacher_probs = F.softmax(self.teacher_logits(x), dim=1)
        x_adv = self.kl_attack(x, teacher_probs, step_seed)
        with self.autocast():
            logits_adv = self.student(x_adv)
            logits = self.student(x)
        kl_adv = kl_per_sample(logits_adv, teacher_probs).mean() / RSLAD_KL_DIVISOR
        kl_nat = kl_per_sample(logits, teacher_probs).mean() / RSLAD_KL_DIVISOR
        total = RSLAD_ADV_WEIGHT * kl_adv + (1.0 - RSLAD_ADV_WEIGHT) * kl_nat
        return total, {"kl_adv": kl_adv.detach(), "kl_nat": kl_nat.detach(), "total": total.detach()}


METHODS = {"natural": Natural, "kd": KD, "robust-kd": RobustKD, "pgd-at": PGDAT, "fgsm-rs": FGSMRS, "n-fgsm": NFGSM,
           "free-at": FreeAT,
           "trades": TRADES, "ard": ARD, "rslad": RSLAD}


def build_method(cfg, student, teacher, info, example_input, autocast):
    return METHODS[cfg.method](student, teacher, cfg, info, example_input, autocast)
