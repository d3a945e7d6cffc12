"""The training configuration: TrainConfig (the run's shared options, then every registered method's own,
rkd_fast.train.methods), its checks, and the metadata every JSON output records. The data sets a run can use
and their options' meaning: rkd_fast.datasets."""

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from ..checks import check_choice as _choice
from ..checks import check_float32
from ..checks import check_number as _number
from ..datasets import DATASETS, LOADERS, SPECS, dataset_info
from ..precision import PRECISIONS
from ..seeding import check_seed
from .methods import METHODS, all_options, method_defaults, on_change, resolve_options
from .methods.base import ALPHA_OF_EPS

SCHEDULES = ("cosine", "multistep", "constant")

# Options that may differ between a run and its --resume (they do not change what is computed).
RESUME_MAY_CHANGE = ("resume", "overwrite", "progress", "out", "ckpt_every", "keep", "device", "command",
                     "data_dir", "download", "num_workers", "loader", "max_bad_steps", "dist_timeout")


@dataclass
class RunOptions:
    """The options of `rkd-fast train` every method shares (the same names, dashes as underscores); TrainConfig
    adds the methods' own (rkd_fast.train.methods)."""

    method: str = "robust-kd"
    dataset: str = "digits"
    data_dir: str | None = None  # root holding the data set's files (rkd_fast.datasets: each set's DatasetSpec)
    download: bool = False  # fetch the files with torchvision when they are missing (the sets that allow it)
    # The val split's size. cifar10, cifar100, fashion-mnist: train images held out as val (None: the data set's
    # DatasetSpec.val_from_train); imagenet and synthetic-imagenet: val images evaluated (None: STREAMING_VAL_SIZE);
    # digits: its whole val split.
    val_size: int | None = None
    # A data set held as tensors: train on a fixed stratified subset of this many train images (None: all of them).
    train_size: int | None = None
    image_size: int | None = None  # imagenet, synthetic-imagenet: side of the square inputs (None: 224)
    num_workers: int | None = None  # imagenet: DataLoader workers per process (None: IMAGENET_WORKERS)
    loader: str | None = None  # imagenet training batches: "pytorch" (None) or "dali" (rkd_fast.datasets)
    synthetic_batches: int | None = None  # synthetic-imagenet: steps per epoch (None: SYNTHETIC_BATCHES)
    arch: str = "small_cnn"
    width: int | None = None  # the architecture's base width; None: its default
    teacher: str | None = None  # a model file (`rkd-fast export` output); the methods that distil need one
    teacher_arch: str | None = None  # when given, the teacher file must hold this architecture
    teacher_weights: str | None = None  # the state_dict of a teacher given as an architecture (rkd_fast.model_source)
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

    def attack_eps(self):
        """The L∞ radius the run attacks with (its methods and its robust validation): --eps, or the data set's
        usual one."""
        return self.eps if self.eps is not None else dataset_info(self.dataset).eps

    def validation_alpha(self):
        """The robust validation's PGD step: --alpha, or ALPHA_OF_EPS · eps."""
        return self.alpha if self.alpha is not None else ALPHA_OF_EPS * self.attack_eps()

    def to_dict(self):
        """The options as run.json records them (each method option in its own JSON form)."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        for name, (option, _) in all_options().items():
            d[name] = option.to_json(getattr(self, name))
        return d


# Every option of `rkd-fast train`: the shared ones, then each method's own (one field per option name).
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", [(name, option.type, field(default=option.default)) for name, (option, _) in all_options().items()],
    bases=(RunOptions,))
TrainConfig.__module__ = __name__  # where pickle finds it (make_dataclass's own module= needs Python 3.12)
TrainConfig.__doc__ = """Every option of `rkd-fast train`: RunOptions' and the training methods' own Options."""


def _sync_method_fields():
    """TrainConfig's own fields made those of the methods registered now (a method may be registered after this
    module is imported, by a user's module or a test). The class is changed in place, not replaced, so every
    module that imported it sees the fields."""
    options = {name: option for name, (option, _) in all_options().items()}
    own = TrainConfig.__annotations__
    if list(own) == list(options) and all(own[name] is option.type for name, option in options.items()):
        return
    for name in list(own):
        if name not in options:
            del own[name]
            if name in vars(TrainConfig):
                delattr(TrainConfig, name)
    for name, option in options.items():
        own[name] = option.type
        setattr(TrainConfig, name, option.default)
    # dataclass() does not replace the methods it generated before: dropped, they are generated anew
    for name in ("__init__", "__repr__", "__eq__", "__match_args__", "__dataclass_fields__"):
        if name in vars(TrainConfig):
            delattr(TrainConfig, name)
    dataclasses.dataclass(TrainConfig)


on_change(_sync_method_fields)


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
    if values.get("milestones") is not None and not isinstance(values["milestones"], (str, bytes)):
        values["milestones"] = tuple(values["milestones"])
    for name, (option, _) in all_options().items():
        if name in values:
            values[name] = option.convert(values[name])
    if isinstance(values.get("command"), (list, tuple)):
        values["command"] = list(values["command"])
    cfg = TrainConfig(**resolve_method_defaults(values))
    if not all(isinstance(word, str) for word in cfg.command):
        raise TypeError(f"command must be a list of strings, got {cfg.command!r}")
    check_config(cfg)
    return cfg


def resolve_method_defaults(values):
    """`values` (TrainConfig fields) with the defaults of the method's options left None on the run's data set
    (`method_defaults`): resolved when the config is made, so run.json records the values the run used."""
    values = dict(values)
    method = values.get("method", TrainConfig.method)
    defaults = method_defaults(method, values.get("dataset", TrainConfig.dataset)) if method in METHODS else {}
    for name, value in defaults.items():
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
    method.check(resolve_options(cfg.method, {name: getattr(cfg, name) for name in method.options()}, cfg.dataset))
    if method.needs_teacher and not cfg.teacher:
        raise ValueError(f"method {cfg.method!r} needs a teacher (--teacher MODEL)")
    if not method.needs_teacher and cfg.teacher:
        raise ValueError(f"method {cfg.method!r} does not use a teacher; drop --teacher")


def check_config(cfg):
    _choice("method", cfg.method, tuple(METHODS))
    _choice("dataset", cfg.dataset, DATASETS)
    _choice("precision", cfg.precision, tuple(PRECISIONS))
    _choice("schedule", cfg.schedule, SCHEDULES)
    from ..model_source import parse_arch, source_kind
    if source_kind(cfg.arch) != "arch":
        raise ValueError(f"--arch {cfg.arch!r}: the student is an architecture (an rkd_fast name, torchvision:NAME or "
                         "timm:NAME), not a trained model")
    parse_arch(cfg.arch)
    if cfg.teacher_weights is not None and not cfg.teacher:
        raise ValueError("--teacher-weights goes with --teacher ARCH (the architecture the weights are for)")
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
    if cfg.validation_alpha() <= 0:
        raise ValueError("the PGD step alpha must be > 0: with eps = 0 give --alpha explicitly")
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
    spec = SPECS[cfg.dataset]
    if cfg.download and not spec.download:
        fetched = [d for d, s in SPECS.items() if s.download]
        raise ValueError(f"--download fetches {'/'.join(fetched)} only; {cfg.dataset} must already be on disk")
    # The data options a data set does not declare are refused rather than silently ignored.
    for name in ("val_size", "image_size", "num_workers", "loader", "synthetic_batches"):
        if getattr(cfg, name) is not None and name not in spec.options:
            applies = [d for d, s in SPECS.items() if name in s.options]
            raise ValueError(f"--{name.replace('_', '-')} applies to --dataset {'/'.join(applies)}, not "
                             f"{cfg.dataset!r}")
    if cfg.loader is not None:
        _choice("loader", cfg.loader, LOADERS)
    _number("val_size", cfg.val_size, minimum=1, integer=True, allow_none=True)
    _number("train_size", cfg.train_size, minimum=1, integer=True, allow_none=True)
    if cfg.train_size is not None and spec.read is None:
        raise ValueError(f"--train-size applies to the data sets held as tensors, not {cfg.dataset!r}")
    if spec.max_val_size is not None and cfg.val_size is not None and cfg.val_size > spec.max_val_size:
        raise ValueError(f"--val-size {cfg.val_size}: {cfg.dataset}'s val split has at most {spec.max_val_size} images")
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
    way the run was started (console, `python -m rkd_fast`, or rkd_fast.cli.main from Python). The methods'
    options write their own words (Option.to_argv)."""
    defaults = TrainConfig()
    method_options = all_options()
    words = ["rkd-fast", "train"]
    for f in dataclasses.fields(TrainConfig):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if f.name == "command" or value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in method_options:
            words += method_options[f.name][0].to_argv(value)
        elif f.name == "progress":
            words.append("--no-progress")
        elif isinstance(value, bool):
            words.append(flag)
        elif f.name == "milestones":
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return words


def run_metadata(cfg, device):
    """What every JSON output of a run records: command, full config, seed, git commit, library versions."""
    from ..provenance import cpu_model, provenance

    return {
        "command": list(cfg.command) or command_line(cfg),
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        **provenance(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
    }
