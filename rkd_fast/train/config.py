"""The training configuration, the data sets a run can use, and the metadata every JSON output records."""

import dataclasses
import importlib.metadata
import math
import numbers
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field

import torch

METHODS = ("natural", "kd", "robust-kd", "pgd-at")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "multistep", "constant")
FEATURE_MODES = ("normalized", "mse", "attention")
DATASETS = ("digits",)

# The feature map a method distils by default, per architecture (the last stage before the classifier head).
DEFAULT_FEATURE_LAYER = {"small_cnn": "block3", "preact_resnet18": "layer4", "resnet18": "layer4"}

# Options that may differ between a run and its --resume (they do not change what is computed).
RESUME_MAY_CHANGE = ("resume", "overwrite", "progress", "out", "ckpt_every", "keep", "device", "command")


@dataclass
class TrainConfig:
    """Every option of `rkd-fast train` (the same names, dashes as underscores).

    Weights of the robust-kd loss are provisional defaults; see the README for tuned values."""

    method: str = "robust-kd"
    dataset: str = "digits"
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
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # "auto": CUDA when available, else CPU
    # Attack options (pgd-at's inner maximisation and the robust validation). None: the data set's default.
    eps: float | None = None
    alpha: float | None = None  # None: eps / 4
    attack_steps: int = 10
    # robust-kd / kd loss
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    kd_temperature: float = 4.0
    feat_weight: float = 1.0
    jac_weight: float = 1.0
    feature_pairs: tuple = ()  # ("student_layer:teacher_layer", ...); empty: DEFAULT_FEATURE_LAYER of each
    feature_mode: str = "normalized"
    jac_h: float | None = None  # None: jacobian_penalty's default step
    jac_direction: str = "gaussian"
    jac_norm: str = "l2"
    jac_on: str = "logits"
    jac_temperature: float = 1.0
    jac_fraction: float = 1.0
    # Evaluation and output
    eval_every: int = 1  # robust validation (PGD with attack_steps steps) every N epochs and after the last
    out: str | None = None  # run directory; None: nothing is written (Python API)
    resume: bool = False
    overwrite: bool = False
    ckpt_every: int = 0  # also checkpoint every N optimizer steps (0: only at epoch ends)
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
    cfg = TrainConfig(**values)
    if not all(isinstance(word, str) for word in cfg.command):
        raise TypeError(f"command must be a list of strings, got {cfg.command!r}")
    check_config(cfg)
    return cfg


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
    _number("seed", cfg.seed, integer=True)
    _number("width", cfg.width, minimum=1, integer=True, allow_none=True)
    for name in ("lr", "kd_temperature"):
        _number(name, getattr(cfg, name), strict=True)
    for name in ("momentum", "weight_decay", "gamma", "ce_weight", "kd_weight", "feat_weight", "jac_weight"):
        _number(name, getattr(cfg, name))
    _number("eps", cfg.eps, allow_none=True)
    _number("alpha", cfg.alpha, strict=True, allow_none=True)
    _number("jac_h", cfg.jac_h, strict=True, allow_none=True)
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing!r}")
    if cfg.nesterov and cfg.momentum == 0:
        raise ValueError("nesterov needs momentum > 0")
    for m in cfg.milestones:
        _number("milestone", m, minimum=1, integer=True)
    cfg.pairs()
    if cfg.method in ("kd", "robust-kd") and not cfg.teacher:
        raise ValueError(f"method {cfg.method!r} needs a teacher model file (--teacher PATH)")
    if cfg.method in ("natural", "pgd-at") and cfg.teacher:
        raise ValueError(f"method {cfg.method!r} does not use a teacher; drop --teacher")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pick one")
    if (cfg.resume or cfg.overwrite) and not cfg.out:
        raise ValueError("--resume and --overwrite need --out DIR")


# --- data ------------------------------------------------------------------------------------------------

@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    mean: tuple
    std: tuple
    eps: float  # the usual L∞ radius on this data set (pixels in [0, 1])


def load_dataset(name, device):
    """The one place a data set is chosen: ``(info, (x_train, y_train), (x_val, y_val))``, tensors on
    `device` with inputs in [0, 1]. The model-selection split is the held-out val split, never test."""
    if name == "digits":
        from .. import data
        info = DatasetInfo("digits", data.NUM_CLASSES, 1, tuple(data.DIGITS_MEAN), tuple(data.DIGITS_STD), 0.1)
        return info, data.load_digits("train", device=device), data.load_digits("val", device=device)
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


# --- metadata --------------------------------------------------------------------------------------------

def _git_commit():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        if not commit:
            return None, None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def library_versions():
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    for package in ("rkd_fast", "numpy", "triton", "scikit-learn", "tqdm"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def run_metadata(cfg, device):
    """What every JSON output of a run records: command, full config, seed, git commit, library versions."""
    from .cli import command_line

    commit, dirty = _git_commit()
    return {
        "command": list(cfg.command) or command_line(cfg),
        "argv": [sys.executable] + sys.argv,  # how this process was started
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "git_commit": commit,
        "git_dirty": dirty,
        "versions": library_versions(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or None,
    }
