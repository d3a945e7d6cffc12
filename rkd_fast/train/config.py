"""The training configuration: TrainConfig (the run's shared options, then every registered method's own,
rkd_fast.train.methods), its checks, and the metadata every JSON output records. The data sets a run can use
and their options' meaning: rkd_fast.datasets."""

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from ..attacks._common import PRECISIONS, check_float32
from ..datasets import DATASETS, LOADERS, STREAMING_DATASETS
from ..ops._dispatch import check_choice as _choice
from ..seeding import check_seed
from .methods import METHODS, all_options, resolve_options
from .methods.distill import parse_feature_pairs
from .options import check_number as _number

SCHEDULES = ("cosine", "multistep", "constant")
SYNTHETIC_VAL_LIMIT = 50_000  # synthetic-imagenet stands in for ImageNet: no larger val split than its

# Options that may differ between a run and its --resume (they do not change what is computed).
RESUME_MAY_CHANGE = ("resume", "overwrite", "progress", "out", "ckpt_every", "keep", "device", "command",
                     "data_dir", "download", "num_workers", "loader", "max_bad_steps", "dist_timeout")


@dataclass
class RunOptions:
    """The options of `rkd-fast train` every method shares (the same names, dashes as underscores); TrainConfig
    adds the methods' own (rkd_fast.train.methods)."""

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
    dist_timeout: float = 600.0  # under torchrun: seconds a collective waits for a rank before the run stops
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # "auto": CUDA when available, else CPU
    # Attack options (pgd-at's inner maximisation and the robust validation). None: the data set's default.
    eps: float | None = None
    alpha: float | None = None  # None: eps / 4
    attack_steps: int = 10
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
        return parse_feature_pairs(self.feature_pairs)


# Every option of `rkd-fast train`: the shared ones, then each method's own (one field per option name).
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", [(name, option.type, field(default=option.default)) for name, (option, _) in all_options().items()],
    bases=(RunOptions,))
TrainConfig.__module__ = __name__  # where pickle finds it (make_dataclass's own module= needs Python 3.12)
TrainConfig.__doc__ = """Every option of `rkd-fast train`: RunOptions' and the training methods' own Options."""


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
    # Sequences (a flag given repeatedly, a JSON list) are held as tuples: the fields' defaults are tuples.
    for key in ("milestones", *(name for name, (option, _) in all_options().items() if option.type is tuple)):
        if key in values and values[key] is not None and not isinstance(values[key], (str, bytes)):
            values[key] = tuple(values[key])
    if isinstance(values.get("command"), (list, tuple)):
        values["command"] = list(values["command"])
    cfg = TrainConfig(**resolve_method_defaults(values))
    if not all(isinstance(word, str) for word in cfg.command):
        raise TypeError(f"command must be a list of strings, got {cfg.command!r}")
    check_config(cfg)
    return cfg


def resolve_method_defaults(values):
    """`values` (TrainConfig fields) with the method's DEFAULTS for its options left None: resolved when the config
    is made, so run.json records the values the run used."""
    values = dict(values)
    method = METHODS.get(values.get("method", TrainConfig.method))
    for name, value in (method.DEFAULTS if method else {}).items():
        if values.get(name) is None:
            values[name] = value
    return values


def check_method_options(cfg):
    """Each option of cfg's method checked, then the method's own rules; an option of another method given a value
    other than its default is refused (it would be silently ignored)."""
    for name, (option, owners) in all_options().items():
        value = getattr(cfg, name)
        if cfg.method in owners:
            option.check(value)
        elif value != option.default:
            raise ValueError(f"{option.cli_flag} applies to --method {'/'.join(owners)}, not {cfg.method!r}")
    method = METHODS[cfg.method]
    method.check(resolve_options(cfg.method, {name: getattr(cfg, name) for name in method.options()}))
    if method.needs_teacher and not cfg.teacher:
        raise ValueError(f"method {cfg.method!r} needs a teacher model file (--teacher PATH)")
    if not method.needs_teacher and cfg.teacher:
        raise ValueError(f"method {cfg.method!r} does not use a teacher; drop --teacher")


def check_config(cfg):
    _choice("method", cfg.method, tuple(METHODS))
    _choice("dataset", cfg.dataset, DATASETS)
    _choice("precision", cfg.precision, tuple(PRECISIONS))
    _choice("schedule", cfg.schedule, SCHEDULES)
    from ..models import MODELS
    _choice("arch", cfg.arch, tuple(sorted(MODELS)))
    for name in ("epochs", "batch_size", "attack_steps", "eval_every", "keep"):
        _number(name, getattr(cfg, name), minimum=1, integer=True)
    _number("ckpt_every", cfg.ckpt_every, integer=True)
    _number("max_bad_steps", cfg.max_bad_steps, integer=True)
    _number("seed", cfg.seed, integer=True)
    _number("width", cfg.width, minimum=1, integer=True, allow_none=True)
    _number("lr", cfg.lr, strict=True)
    _number("dist_timeout", cfg.dist_timeout, strict=True)
    for name in ("momentum", "weight_decay", "gamma"):
        _number(name, getattr(cfg, name))
    _number("eps", cfg.eps, allow_none=True)
    _number("alpha", cfg.alpha, strict=True, allow_none=True)
    for name in ("eps", "alpha"):  # the attacks draw and step in float32: a radius past its range overflows there
        check_float32(f"--{name}", getattr(cfg, name))
    check_seed("--seed", cfg.seed)
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing!r}")
    if cfg.nesterov and cfg.momentum == 0:
        raise ValueError("nesterov needs momentum > 0")
    for m in cfg.milestones:
        _number("milestone", m, minimum=1, integer=True)
    check_method_options(cfg)
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
    if cfg.dataset == "synthetic-imagenet" and cfg.val_size is not None and cfg.val_size > SYNTHETIC_VAL_LIMIT:
        raise ValueError(f"--val-size {cfg.val_size}: synthetic-imagenet's val split has at most "
                         f"{SYNTHETIC_VAL_LIMIT} images (ImageNet's val split)")
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
