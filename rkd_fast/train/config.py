"""The training configuration and the metadata every JSON output records (the data sets a run can use:
rkd_fast.datasets)."""

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field

import torch

from ..datasets import DATASETS, LOADERS, STREAMING_DATASETS

METHODS = ("natural", "kd", "robust-kd", "pgd-at", "fgsm-rs", "n-fgsm", "free-at", "trades", "ard", "rslad")
TEACHER_METHODS = ("kd", "robust-kd", "ard", "rslad")  # the methods that distil a teacher (need --teacher)
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "multistep", "constant")
FEATURE_MODES = ("normalized", "mse", "attention")
# The feature map a method distils by default, per architecture (the last stage before the classifier head).
DEFAULT_FEATURE_LAYER = {"small_cnn": "block3", "preact_resnet18": "layer4", "resnet18": "layer4",
                         "resnet34": "layer4", "resnet50": "layer4", "wide_resnet34_10": "layer3",
                         "mobilenet_v2": "features"}

# The loss weights of the distilling methods when not given (None). robust-kd's: the best of the frontier study's
# search (docs/frontier.md): CE and the teacher's soft labels at T = 1 at the student's adversarial point, the
# feature maps there too; its finite-difference Jacobian term lowered AutoAttack accuracy there, so it is off.
LOSS_DEFAULTS = {
    "kd": {"ce_weight": 1.0, "kd_weight": 1.0, "kd_temperature": 4.0, "feat_weight": 0.0, "jac_weight": 0.0},
    "robust-kd": {"ce_weight": 1.0, "kd_weight": 1.0, "kd_temperature": 1.0, "feat_weight": 1.0, "jac_weight": 0.0},
}
DISTILL_AT = ("adversarial", "clean")

# Published values of the baselines' own options (docs/baselines.md gives the sources).
TRADES_BETA = 6.0  # Zhang et al. 2019, CIFAR-10 (1/λ)
ARD_TEMPERATURE = 30.0  # Goldblum et al. 2020, official main.py --temp
ARD_ALPHA = 1.0  # official main.py --alpha: weight of the distillation term, (1 − α) on clean CE
FGSM_RS_ALPHA = 1.25  # Wong et al. 2020: step 1.25·eps from a uniform start in the eps-ball
N_FGSM_NOISE = 2.0  # de Jorge et al. 2022: noise uniform in [−2·eps, 2·eps], step eps, no projection
FREE_AT_REPLAYS = 8  # Shafahi et al. 2019: m = 8 replays of each minibatch on CIFAR (4 on ImageNet)

# Options that may differ between a run and its --resume (they do not change what is computed).
RESUME_MAY_CHANGE = ("resume", "overwrite", "progress", "out", "ckpt_every", "keep", "device", "command",
                     "data_dir", "download", "num_workers", "loader", "max_bad_steps")


@dataclass
class TrainConfig:
    """Every option of `rkd-fast train` (the same names, dashes as underscores).

    The robust-kd defaults (feat_weight, jac_h) were tuned on digits: docs/demo_tuning.md."""

    method: str = "robust-kd"
    dataset: str = "digits"
    data_dir: str | None = None  # root holding the data set's files (cifar10, cifar100, imagenet)
    download: bool = False  # CIFAR only: fetch the files with torchvision when they are missing
    # The val split's size. CIFAR: train images held out as val (None: CIFAR_VAL_SIZE); imagenet and
    # synthetic-imagenet: val images evaluated (None: STREAMING_VAL_SIZE); digits: its whole val split.
    val_size: int | None = None
    image_size: int | None = None  # imagenet, synthetic-imagenet: side of the square inputs (None: 224)
    num_workers: int | None = None  # imagenet: DataLoader workers per process (None: IMAGENET_WORKERS)
    loader: str | None = None  # imagenet training batches: "pytorch" (None) or "dali" (rkd_fast.datasets)
    synthetic_batches: int | None = None  # synthetic-imagenet: steps per epoch (None: SYNTHETIC_BATCHES)
    arch: str = "small_cnn"
    width: int | None = None  # the architecture's base width; None: its default
    teacher: str | None = None  # a model file (`rkd-fast export` output); kd and robust-kd need one
    teacher_arch: str | None = None  # when given, the teacher file must hold this architecture
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # per step: cosine to 0, multistep (×gamma at each milestone epoch), or constant
    milestones: tuple = ()  # epochs for multistep; empty: half and three quarters of the epochs
    gamma: float = 0.1
    label_smoothing: float = 0.0
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch (CUDA only)
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # "auto": CUDA when available, else CPU
    # Attack options (pgd-at's inner maximisation and the robust validation). None: the data set's default.
    eps: float | None = None
    alpha: float | None = None  # None: eps / 4
    attack_steps: int = 10
    # kd / robust-kd loss. None: the method's default (LOSS_DEFAULTS; robust-kd's measured in docs/frontier.md).
    ce_weight: float | None = None
    kd_weight: float | None = None
    kd_temperature: float | None = None
    feat_weight: float | None = None
    jac_weight: float | None = None
    feature_pairs: tuple = ()  # ("student_layer:teacher_layer", ...); empty: DEFAULT_FEATURE_LAYER of each
    feature_mode: str = "normalized"
    # Where robust-kd evaluates its terms (rkd_fast.losses): "adversarial", the student's single-step adversarial
    # point (start noise adv_noise·eps, one step of h along the sign of its input gradient); or "clean", the input,
    # with the Jacobian term along a random direction (Zhang & Yi's recipe).
    distill_at: str = "adversarial"
    adv_noise: float = 2.0  # units of eps (N-FGSM's)
    # The finite-difference step in units of the threat model: h = jac_step·eps (L∞ directions, and the
    # adversarial point) or jac_step·eps·sqrt(D) (L2 directions, D values per sample), so that one default means
    # the same on digits, CIFAR and ImageNet. jac_h: an absolute step instead.
    jac_step: float = 1.0
    jac_h: float | None = None
    jac_direction: str = "gaussian"  # distill_at="clean" only, as jac_norm and jac_fraction
    jac_norm: str = "l2"
    jac_on: str = "logits"
    jac_temperature: float = 1.0
    jac_fraction: float = 1.0
    free_replays: int = FREE_AT_REPLAYS  # free-at: optimizer steps per minibatch (m)
    # Baselines' own options; None: the published value (TRADES_BETA, ARD_TEMPERATURE, ARD_ALPHA)
    trades_beta: float | None = None
    ard_temperature: float | None = None
    ard_alpha: float | None = None
    # Evaluation and output
    eval_every: int = 1  # robust validation (PGD with attack_steps steps) every N epochs and after the last
    out: str | None = None  # run directory; None: nothing is written (Python API)
    resume: bool = False
    overwrite: bool = False
    ckpt_every: int = 0  # also checkpoint every N optimizer steps (0: only at epoch ends)
    max_bad_steps: int = 0  # steps with a NaN/Inf loss skipped before the run stops (0: stop at the first)
    keep: int = 3  # rolling checkpoints kept
    progress: bool = True
    # The command recorded in the JSON outputs; empty: the equivalent `rkd-fast train` command line.
    command: list = field(default_factory=list)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        d["feature_pairs"] = [list(p) for p in self.pairs()] if self.feature_pairs else []
        return d

    def pairs(self):
        """feature_pairs as (student_name, teacher_name) tuples; "a:b" strings and 2-sequences accepted."""
        pairs = []
        for item in self.feature_pairs:
            if isinstance(item, str):
                if item.count(":") != 1 or not all(item.split(":")):
                    raise ValueError(f"feature pair {item!r} must be 'student_layer:teacher_layer'")
                pairs.append(tuple(item.split(":")))
            elif isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(n, str) for n in item):
                pairs.append(tuple(item))
            else:
                raise ValueError(f"feature pair {item!r} must be 'student_layer:teacher_layer' or a (str, str) pair")
        return pairs


def make_config(config=None, **overrides):
    """A checked TrainConfig from a TrainConfig, a dict, or keyword arguments (which override)."""
    if config is None:
        values = {}
    elif isinstance(config, TrainConfig):
        values = dataclasses.asdict(config)
    elif isinstance(config, dict):
        values = dict(config)
    else:
        raise TypeError(f"config must be a TrainConfig or a dict, got {type(config).__name__}")
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"unknown training option(s): {', '.join(unknown)}")
    for key in ("milestones", "feature_pairs"):
        if key in values and values[key] is not None and not isinstance(values[key], (str, bytes)):
            values[key] = tuple(values[key])
    if isinstance(values.get("command"), (list, tuple)):
        values["command"] = list(values["command"])
    cfg = TrainConfig(**resolve_loss_defaults(values))
    if not all(isinstance(word, str) for word in cfg.command):
        raise TypeError(f"command must be a list of strings, got {cfg.command!r}")
    check_config(cfg)
    return cfg


def resolve_loss_defaults(values):
    """`values` (TrainConfig fields) with the method's LOSS_DEFAULTS for the loss weights left None: resolved when
    the config is made, so run.json records the values the run used."""
    values = dict(values)
    for name, value in LOSS_DEFAULTS.get(values.get("method", TrainConfig.method), {}).items():
        if values.get(name) is None:
            values[name] = value
    return values


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


def _number(name, value, *, minimum=0.0, strict=False, integer=False, allow_none=False):
    if value is None and allow_none:
        return
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")


def check_config(cfg):
    _choice("method", cfg.method, METHODS)
    _choice("dataset", cfg.dataset, DATASETS)
    _choice("precision", cfg.precision, PRECISIONS)
    _choice("schedule", cfg.schedule, SCHEDULES)
    _choice("feature_mode", cfg.feature_mode, FEATURE_MODES)
    from ..models import MODELS
    _choice("arch", cfg.arch, tuple(sorted(MODELS)))
    for name in ("epochs", "batch_size", "attack_steps", "eval_every", "keep"):
        _number(name, getattr(cfg, name), minimum=1, integer=True)
    _number("ckpt_every", cfg.ckpt_every, integer=True)
    _number("max_bad_steps", cfg.max_bad_steps, integer=True)
    _number("free_replays", cfg.free_replays, minimum=1, integer=True)
    if cfg.free_replays != FREE_AT_REPLAYS and cfg.method != "free-at":
        raise ValueError(f"--free-replays applies to --method free-at, not {cfg.method!r}")
    _number("seed", cfg.seed, integer=True)
    _number("width", cfg.width, minimum=1, integer=True, allow_none=True)
    _number("lr", cfg.lr, strict=True)
    for name in ("momentum", "weight_decay", "gamma"):
        _number(name, getattr(cfg, name))
    _choice("distill_at", cfg.distill_at, DISTILL_AT)
    for name in ("adv_noise", "jac_step"):
        _number(name, getattr(cfg, name), strict=name == "jac_step")
    if cfg.method in LOSS_DEFAULTS:
        for name in ("ce_weight", "kd_weight", "feat_weight", "jac_weight"):
            _number(name, getattr(cfg, name))
        _number("kd_temperature", cfg.kd_temperature, strict=True)
        if cfg.method == "kd" and (cfg.feat_weight or cfg.jac_weight):
            raise ValueError("--feat-weight and --jac-weight apply to --method robust-kd, not 'kd' (its loss is "
                             "CE + KD)")
    else:
        given = [name for name in LOSS_DEFAULTS["robust-kd"] if getattr(cfg, name) is not None]
        if given:  # silently ignored otherwise
            raise ValueError(f"--{given[0].replace('_', '-')} applies to --method kd or robust-kd, not "
                             f"{cfg.method!r}")
    _number("eps", cfg.eps, allow_none=True)
    _number("alpha", cfg.alpha, strict=True, allow_none=True)
    _number("jac_h", cfg.jac_h, strict=True, allow_none=True)
    from ..jacobian import check_options
    try:
        check_options(direction=cfg.jac_direction, norm=cfg.jac_norm, on=cfg.jac_on, temperature=cfg.jac_temperature,
                      fraction=cfg.jac_fraction)
    except ValueError as error:  # in the trainer's words: the option's flag
        raise ValueError(f"--jac-{error}") from error
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing!r}")
    if cfg.nesterov and cfg.momentum == 0:
        raise ValueError("nesterov needs momentum > 0")
    for m in cfg.milestones:
        _number("milestone", m, minimum=1, integer=True)
    cfg.pairs()
    if cfg.method in TEACHER_METHODS and not cfg.teacher:
        raise ValueError(f"method {cfg.method!r} needs a teacher model file (--teacher PATH)")
    if cfg.method not in TEACHER_METHODS and cfg.teacher:
        raise ValueError(f"method {cfg.method!r} does not use a teacher; drop --teacher")
    # A baseline's option given to another method would be silently ignored: refuse it instead.
    for name, method in (("trades_beta", "trades"), ("ard_temperature", "ard"), ("ard_alpha", "ard")):
        if getattr(cfg, name) is not None and cfg.method != method:
            raise ValueError(f"--{name.replace('_', '-')} applies to --method {method}, not {cfg.method!r}")
    _number("trades_beta", cfg.trades_beta, allow_none=True)
    _number("ard_temperature", cfg.ard_temperature, strict=True, allow_none=True)
    _number("ard_alpha", cfg.ard_alpha, allow_none=True)
    if cfg.ard_alpha is not None and cfg.ard_alpha > 1:
        raise ValueError(f"ard_alpha must be in [0, 1], got {cfg.ard_alpha!r}")
    # Data selection
    if cfg.data_dir is not None and not isinstance(cfg.data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a path, got {cfg.data_dir!r}")
    if cfg.dataset not in ("cifar10", "cifar100") and cfg.download:
        raise ValueError(f"--download fetches CIFAR only; {cfg.dataset} must already be on disk")
    if cfg.dataset == "digits" and cfg.val_size is not None:
        raise ValueError("--val-size applies to cifar10/cifar100 (train images held out as val) and imagenet/"
                         "synthetic-imagenet (val images evaluated); digits evaluates its whole val split")
    # Options of the streaming data sets, refused elsewhere rather than silently ignored.
    for name, applies in (("image_size", STREAMING_DATASETS), ("num_workers", ("imagenet",)),
                          ("loader", ("imagenet",)), ("synthetic_batches", ("synthetic-imagenet",))):
        if getattr(cfg, name) is not None and cfg.dataset not in applies:
            raise ValueError(f"--{name.replace('_', '-')} applies to --dataset {'/'.join(applies)}, not "
                             f"{cfg.dataset!r}")
    if cfg.loader is not None:
        _choice("loader", cfg.loader, LOADERS)
    _number("val_size", cfg.val_size, minimum=1, integer=True, allow_none=True)
    _number("image_size", cfg.image_size, minimum=1, integer=True, allow_none=True)
    _number("num_workers", cfg.num_workers, integer=True, allow_none=True)
    _number("synthetic_batches", cfg.synthetic_batches, minimum=1, integer=True, allow_none=True)
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pick one")
    if (cfg.resume or cfg.overwrite) and not cfg.out:
        raise ValueError("--resume and --overwrite need --out DIR")


# --- metadata --------------------------------------------------------------------------------------------

def command_line(cfg):
    """The `rkd-fast train` command that reproduces `cfg` (its options that differ from the defaults), whatever
    way the run was started (console, `python -m rkd_fast`, or rkd_fast.cli.main from Python)."""
    defaults = TrainConfig()
    words = ["rkd-fast", "train"]
    for f in dataclasses.fields(TrainConfig):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if f.name == "command" or value == default or (f.name == "feature_pairs" and not value):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "progress":
            words.append("--no-progress")
        elif isinstance(value, bool):
            words.append(flag)
        elif f.name == "feature_pairs":
            words += [w for pair in cfg.pairs() for w in ("--feature-pair", ":".join(pair))]
        elif f.name == "milestones":
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return words


def run_metadata(cfg, device):
    """What every JSON output of a run records: command, full config, seed, git commit, library versions."""
    from ..info import cpu_model, provenance

    return {
        "command": list(cfg.command) or command_line(cfg),
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        **provenance(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
    }
