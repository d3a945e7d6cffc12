"""Distilling a teacher through RobustKDLoss: kd (Hinton et al.) and robust-kd (rkd_fast.losses)."""

import math

import torch

from ...clean_pass import share_clean_statistics
from ...jacobian import ESTIMATORS as JACOBIAN_ESTIMATORS
from ...jacobian import check_options
from ...losses import KD_SAMPLES, TEACHER_AT, RobustKDLoss
from ...model_source import default_feature_layer
from ...models import DEFAULT_FEATURE_LAYER
from ...ops.feature_distance import MODES as FEATURE_MODES
from ..options import Option
from .base import Method, register

DISTILL_AT = ("adversarial", "clean")
TEACHER_CACHE = ("auto", "on", "off")
# Zhang & Yi's recipe at the clean input: feature weight 3, Jacobian weight 1, T 4 (the trainer's defaults before
# the frontier study), whatever a data set's own defaults (DatasetInfo.method_defaults)
CLEAN_RECIPE = {"distill_at": "clean", "teacher_at": "student", "ce_weight": 1.0, "kd_weight": 1.0, "feat_weight": 3.0,
                "jac_weight": 1.0, "kd_temperature": 4.0}


class Distill(Method):
    """kd and robust-kd: a RobustKDLoss with the method's weights (None: the method's DEFAULTS)."""

    needs_teacher = True
    OPTIONS = (
        Option("ce_weight", None, "weight of the cross-entropy term (each method's default: above)"),
        Option("kd_weight", None, "weight of the soft-label (KL) term"),
        Option("kd_temperature", None, "temperature of the soft labels", strict=True),
        Option("kd_samples", "all", type=str, choices=KD_SAMPLES,
               help="the soft-label term on every sample (default) or only where the teacher predicts the label "
                    "at the input it sees"),
        Option("feat_weight", None, "robust-kd: weight of the feature-map term"),
        Option("jac_weight", None, "robust-kd: weight of the finite-difference Jacobian term"),
        Option("teacher_cache", "auto", type=str, choices=TEACHER_CACHE,
               help="compute the teacher's soft labels once per training image before the first step instead of in "
                    "every step, where they are all the loss asks of the teacher (kd; robust-kd with --teacher-at "
                    "clean, --feat-weight 0 and --jac-weight 0) and the data set does not crop or flip its training "
                    "images: auto (default) where both hold, on (an error where they do not), off. The same "
                    "loss up to the rounding of the teacher's forward in other batches"),
    )

    def loss_options(self):
        raise NotImplementedError

    def __init__(self, student, teacher, run, opt, example_input, autocast):
        super().__init__(student, teacher, run, opt, example_input, autocast)
        self.example_shape = tuple(example_input.shape)
        self.example_input = example_input
        self.loss_fn = RobustKDLoss(student, teacher, example_input=example_input,
                                    label_smoothing=run.label_smoothing, kd_temperature=opt.kd_temperature,
                                    kd_samples=opt.kd_samples, ce_weight=opt.ce_weight, kd_weight=opt.kd_weight,
                                    **self.loss_options())
        if opt.teacher_cache == "on" and not self.loss_fn.takes_teacher_logits:
            raise ValueError("--teacher-cache on: the teacher's soft labels at the clean input must be all the loss "
                             "asks of the teacher (--kd-weight > 0, --feat-weight 0, --jac-weight 0 and, at the "
                             "adversarial point, --teacher-at clean)")
        self.cached_teacher_logits = None  # (N, classes) on the device, by training sample: not model state

    def plan_precompute(self, fixed_inputs):
        if self.opt.teacher_cache == "on" and not fixed_inputs:
            raise ValueError("--teacher-cache on: the training images are cropped and flipped anew each epoch, so "
                             "the teacher's soft labels differ from one epoch to the next")
        return self.opt.teacher_cache != "off" and fixed_inputs and self.loss_fn.takes_teacher_logits

    def precompute(self, batches):
        with self.autocast():
            self.cached_teacher_logits = torch.cat([self.loss_fn.teacher_logits(x) for x, _ in batches])

    def forward(self, x, y, step_seed, indices=None):
        teacher_logits = None if indices is None else self.cached_teacher_logits[indices]
        with self.autocast():
            return self.loss_fn(x, y, seed=step_seed, teacher_logits=teacher_logits)


@register
class KD(Distill):
    """Hinton et al.'s knowledge distillation: ce_weight · CE + kd_weight · T² · KL at temperature T."""

    name = "kd"
    DEFAULTS = {"ce_weight": 1.0, "kd_weight": 1.0, "kd_temperature": 4.0, "feat_weight": 0.0, "jac_weight": 0.0}

    @classmethod
    def check(cls, opt):
        if opt.feat_weight or opt.jac_weight:
            raise ValueError("--feat-weight and --jac-weight apply to --method robust-kd, not 'kd' (its loss is "
                             "CE + KD)")

    def loss_options(self):
        return {"feat_weight": 0.0, "jac_weight": 0.0}

    @classmethod
    def cost_units(cls, opt, attack_steps):
        return {"S_fb": 1} if opt.teacher_cache == "on" else {"S_fb": 1, "T_f": 1}  # as robust-kd's


def parse_feature_pair(item):
    """(student_name, teacher_name) from an "a:b" string or a (str, str) pair."""
    if isinstance(item, str):
        if item.count(":") != 1 or not all(item.split(":")):
            raise ValueError(f"feature pair {item!r} must be 'student_layer:teacher_layer'")
        return tuple(item.split(":"))
    if isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(n, str) for n in item):
        return tuple(item)
    raise ValueError(f"feature pair {item!r} must be 'student_layer:teacher_layer' or a (str, str) pair")


def parse_feature_pairs(items):
    """(student_name, teacher_name) tuples from "a:b" strings and (str, str) pairs."""
    return [parse_feature_pair(item) for item in items]


def step_in_threat_units(kappa, eps, norm, input_shape):
    """The finite-difference step h = κ·eps for an L∞ (sign) direction, κ·eps·sqrt(D) for a unit L2 direction (D
    values per sample): the same fraction of the threat model's radius whatever the input size (8×8 digits: D = 64;
    CIFAR: 3,072; ImageNet: 150,528)."""
    d = math.prod(input_shape[1:])
    return kappa * eps * (math.sqrt(d) if norm == "l2" else 1.0)


@register
class RobustKD(Distill):
    """Robust knowledge distillation: CE + KD + feature-map matching + finite-difference Jacobian matching, at the
    student's single-step adversarial point (distill_at="adversarial", the default) or at the clean input
    (distill_at="clean"); see rkd_fast.losses.

    Its defaults: the best of the frontier study's search on digits (docs/frontier.md): CE and the teacher's soft
    labels at T = 1 at the student's adversarial point, the feature maps there too; its finite-difference Jacobian
    term lowered AutoAttack accuracy there, so it is off. A data set may set its own (DatasetInfo.method_defaults):
    on Fashion-MNIST the teacher's clean soft labels alone, the best measured there."""

    name = "robust-kd"
    # Zhang & Yi's recipe at the clean input, with the trainer's defaults before the frontier study (h = 0.3 L2)
    STUDY_VARIANTS = {"robust-kd:clean": {**CLEAN_RECIPE, "jac_h": 0.3}}
    # its terms switched on and off, the clean-input recipe, and that recipe with the exact (double-backprop)
    # Jacobian instead of the finite difference
    BENCH_VARIANTS = {"+jac": {"jac_weight": 1.0}, "-feat": {"feat_weight": 0.0}, "clean": CLEAN_RECIPE,
                      "exact": {**CLEAN_RECIPE, "jac_estimator": "exact"}}
    DEFAULTS = {"ce_weight": 1.0, "kd_weight": 1.0, "kd_temperature": 1.0, "feat_weight": 1.0, "jac_weight": 0.0,
                "teacher_at": "student"}
    OPTIONS = (
        Option("feature_pairs", (), type=tuple, flag="--feature-pair", metavar="S:T", item=parse_feature_pair,
               item_text=":".join,
               help="student and teacher module names whose outputs are matched, any module of any source "
                    "(`rkd-fast layers MODEL` lists them); maps (N, C, H, W) or token sequences (N, L, C), an "
                    "adapter where channels or sizes differ; repeatable. Default: the last stage before the "
                    "pooling: " + ", ".join(f"{a}: {m}" for a, m in DEFAULT_FEATURE_LAYER.items())
                    + "; timm: the last entry of the model's feature_info; torchvision and others: the last "
                      "top-level module before the pooling (resnet: layer4, mobilenet: features, vit: encoder)"),
        Option("feature_mode", "normalized", "how feature maps are compared", type=str, choices=FEATURE_MODES),
        Option("distill_at", "adversarial", type=str, choices=DISTILL_AT,
               help="evaluate the terms at the student's single-step adversarial point (default) or at the clean "
                    "input, with the Jacobian term along a random direction (Zhang & Yi)"),
        Option("teacher_at", None, type=str, choices=TEACHER_AT,
               help="the input of the teacher's soft labels and features: the student's (its adversarial point, or "
                    "the clean input with --distill-at clean; default) or the clean input (ARD's and RSLAD's "
                    "targets)"),
        Option("adv_noise", 2.0, "the adversarial point's start noise, in units of --eps (default: %(default)s)"),
        Option("adv_steps", 1, type=int, minimum=1,
               help="the adversarial point's attack steps: 1, N-FGSM (default); k >= 2, PGD-k as pgd-at takes it (a "
                    "uniform start in the eps-ball, steps of --adv-alpha, projected); no Jacobian term"),
        Option("adv_alpha", 0.5, strict=True,
               help="--adv-steps >= 2: the PGD step, in units of --eps (default: %(default)s, the study's pgd-2)"),
        Option("jac_step", 1.0, strict=True,
               help="finite-difference step in units of the threat model: jac_step·eps (L∞, and the adversarial "
                    "point) or jac_step·eps·sqrt(D) (L2 directions) (default: %(default)s)"),
        Option("jac_h", None, strict=True,
               help="an absolute finite-difference step on the [0, 1] pixel scale instead of --jac-step"),
        Option("jac_direction", "gaussian", "--distill-at clean: the direction of the finite difference", type=str,
               choices=("rademacher", "gaussian", "grad")),
        Option("jac_norm", "l2", "--distill-at clean: the norm of the direction", type=str, choices=("l2", "linf")),
        Option("jac_on", "logits", "what the Jacobian term differentiates", type=str, choices=("logits", "probs")),
        Option("jac_temperature", 1.0, "temperature of --jac-on probs", minimum=None),
        Option("jac_fraction", 1.0, "--distill-at clean: the fraction of the batch the term is evaluated on",
               minimum=None),
        Option("jac_estimator", "fd", type=str, choices=JACOBIAN_ESTIMATORS,
               help="how J·d is computed: fd, the finite difference (default), or exact, double backprop (the "
                    "accuracy reference; about three training passes)"),
    )

    @classmethod
    def check(cls, opt):
        parse_feature_pairs(opt.feature_pairs)
        try:  # in the trainer's words: the option's flag
            check_options(direction=opt.jac_direction, norm=opt.jac_norm, on=opt.jac_on,
                          temperature=opt.jac_temperature, fraction=opt.jac_fraction)
        except ValueError as error:
            raise ValueError(f"--jac-{error}") from error
        if opt.adv_steps > 1 and (opt.distill_at != "adversarial" or opt.jac_weight > 0):
            raise ValueError(f"--adv-steps {opt.adv_steps} sets the adversarial point of --distill-at adversarial, "
                             "without the Jacobian term (its finite difference runs along the single N-FGSM step): "
                             "--jac-weight 0")
        if opt.distill_at == "adversarial" and opt.jac_estimator != "fd":
            raise ValueError(f"--jac-estimator {opt.jac_estimator} applies to --distill-at clean: at the adversarial "
                             "point the Jacobian term is the finite difference along the attack's step")

    def feature_pairs(self):
        pairs = parse_feature_pairs(self.opt.feature_pairs)
        if not pairs and self.opt.feat_weight > 0:
            s_layer = default_feature_layer(self.student, self.example_input)
            t_layer = default_feature_layer(self.teacher, self.example_input)
            for side, layer, arch in (("student", s_layer, self.run.arch), ("teacher", t_layer, self.run.teacher_arch)):
                if layer is None:
                    raise ValueError(f"no default feature layer for the {side} {arch!r}: give --feature-pair "
                                     "STUDENT_LAYER:TEACHER_LAYER (`rkd-fast layers` lists them; or --feat-weight 0)")
            pairs = [(s_layer, t_layer)]
        return pairs

    def loss_options(self):
        opt, eps = self.opt, self.run.eps
        options = {"feat_weight": opt.feat_weight, "jac_weight": opt.jac_weight,
                   "feature_pairs": self.feature_pairs(), "feature_mode": opt.feature_mode}
        jacobian = {"on": opt.jac_on, "temperature": opt.jac_temperature}
        if opt.distill_at == "adversarial":
            h = opt.jac_h if opt.jac_h is not None else opt.jac_step * eps
            return {**options, "eps": eps, "noise": opt.adv_noise, "steps": opt.adv_steps,
                    "alpha": opt.adv_alpha * eps, "teacher_at": opt.teacher_at, "jacobian": {**jacobian, "h": h}}
        h = opt.jac_h if opt.jac_h is not None else step_in_threat_units(opt.jac_step, eps, opt.jac_norm,
                                                                          self.example_shape)
        return {**options, "jacobian": {**jacobian, "h": h, "direction": opt.jac_direction, "norm": opt.jac_norm,
                                        "fraction": opt.jac_fraction, "estimator": opt.jac_estimator}}

    def prepare_student(self, *, compile, sync_bn, world_size):
        if self.opt.jac_weight <= 0:
            return
        if sync_bn and world_size > 1:
            raise ValueError("--sync-bn with the robust-kd Jacobian term is not supported: jacobian_penalty's "
                             "perturbed pass reuses the clean pass's BatchNorm statistics, which SyncBatchNorm does "
                             "not expose; drop --sync-bn (per-process BatchNorm) or set --jac-weight 0")
        if compile:
            # The Jacobian term's clean and perturbed passes share batch statistics inside each BatchNorm, in one
            # call a compiled graph can hold (hooks added per call would be skipped by it).
            share_clean_statistics(self.student)

    @classmethod
    def cost_units(cls, opt, attack_steps):
        jacobian = opt.jac_weight > 0
        # the soft labels' teacher forward, unless they are computed before training (counted where "auto" may
        # compute them: it depends on the data set)
        soft_labels = {} if opt.teacher_cache == "on" else {"T_f": 1}
        if opt.distill_at == "adversarial":
            # the attack pass (forward + input backward), the training pass at the adversarial point and its
            # teacher forward; with the Jacobian term, the start's student pass (backpropagated) and teacher forward
            # (--adv-steps k: k attack passes)
            return {"S_fb": 3, "T_f": 2} if jacobian else {"S_fb": 1 + opt.adv_steps, **soft_labels}
        if jacobian and opt.jac_estimator == "exact":
            # double backprop: forward, backward with create_graph, then backward through both (~3 fwd+bwd), and
            # the teacher's J·d by an input backward
            return {"S_fb": 3, "T_fb": 1}
        # clean (+ perturbed, with the Jacobian term) student passes, backpropagated; and their teacher passes
        return {"S_fb": 2, "T_f": 2} if jacobian else {"S_fb": 1, **soft_labels}
