"""What a data set is, and the registry of them.

Each data set is one module of this package that declares itself with `register_dataset`: its `DatasetInfo`
(classes, input shape, normalisation statistics, L∞ radius, splits) and a `DatasetSpec` saying how its splits are
opened (files, checks, val split, augmentation, the split `rkd-fast eval` reads, whether it needs --data-dir, which
data options of `rkd-fast train` apply). Training, evaluation, the demo and the study open data through
`rkd_fast.datasets.run`, which reads only these declarations: no code outside a data set's module branches on its
name. Also here: the defaults a run uses when an option is not given."""

from dataclasses import dataclass, field
from typing import Callable

# Per-channel statistics for the models' input normalisation (rkd_fast.models builds them in).
DIGITS_MEAN = (0.3049,)  # of digits' train split
DIGITS_STD = (0.3758,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    input_size: tuple  # (H, W) the models see
    mean: tuple  # per-channel statistics for the models' InputNormalization
    std: tuple
    eps: float  # the usual L∞ radius on this data set (pixels in [0, 1])
    splits: tuple
    stem: str | None = None  # the stem of the models that take a `stem` argument; None: their default (CIFAR's)
    # a method's option defaults on this data set, over the method's own DEFAULTS (each one measured: the data
    # set's section of docs/frontier.md); read only by rkd_fast.train.methods.method_defaults
    method_defaults: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class DatasetSpec:
    """How a data set's splits are opened. A data set is either held as tensors (``read``) or streamed from files
    or a generator (``run_data``, ``loader``, ``eval_data``).

    read(split, data_dir, *, download, verify) -> (x, y) on the host: x (N, C, H, W) uint8 (0..255) or float in
    [0, 1], y int64; raises FileNotFoundError (files missing) or ValueError (files wrong), naming the file.
    val_from_train: the size of the fixed stratified val split a run holds out of train (--val-size overrides);
    None: the data set has a "val" split of its own. augment: a run's training batches are cropped and flipped
    (GPULoader). eval_split: the split `rkd-fast eval` reads unless --split; None: eval does not read it.
    data_dir: what --data-dir must hold; None: no data directory needed. download: --download can fetch the files.
    options: the data options of `rkd-fast train` (TrainConfig fields) that apply; the others are refused.
    files(split, data_dir) -> the paths a split is read from, where it is a fixed set of files (their hashes go
    into a run's checkpoints, so a resume notices changed data); None: embedded, generated or a folder tree.
    Streaming data sets: run_data(cfg, device, info, shard) -> (info, train, val) as rkd_fast.datasets.run_data;
    loader(split, data_dir, **build_dataset's keywords) -> a loader; eval_data(split, data_dir, n_examples,
    batch_size, device, image_size, num_workers) -> (batches, num_samples, num_classes)."""

    info: DatasetInfo
    read: Callable | None = None
    val_from_train: int | None = None
    augment: bool = False
    eval_split: str | None = "test"
    data_dir: str | None = None
    download: bool = False
    options: tuple = ()
    run_data: Callable | None = None
    loader: Callable | None = None
    eval_data: Callable | None = None
    files: Callable | None = None
    max_val_size: int | None = None  # the most --val-size can ask for
    needs_data_dir: bool = field(default=None)  # derived: data_dir is not None, unless given

    def __post_init__(self):
        if self.needs_data_dir is None:
            object.__setattr__(self, "needs_data_dir", self.data_dir is not None)
        if (self.read is None) == (self.run_data is None):
            raise ValueError(f"data set {self.info.name!r}: declare either read (tensors) or run_data (streamed)")


DATASETS = {}  # name -> DatasetInfo, in registration order
SPECS = {}  # name -> DatasetSpec


def register_dataset(spec):
    """Adds a data set (its DatasetSpec) to the registry; returns the spec."""
    name = spec.info.name
    if name in SPECS:
        raise ValueError(f"data set {name!r} is registered twice")
    SPECS[name] = spec
    DATASETS[name] = spec.info
    return spec


LOADERS = ("pytorch", "dali")  # imagenet training batches: DataLoader workers, or NVIDIA DALI

# A run's defaults for the data options left None (rkd_fast.train.config.TrainConfig).
CIFAR_VAL_SIZE = 1000  # images of CIFAR train held out as the val split (CIFAR has no val split of its own)
# imagenet, synthetic-imagenet: images of the val split the robust validation evaluates unless --val-size (a
# fixed stratified subset of ImageNet's 50,000: PGD over all of them at every evaluation is slow).
STREAMING_VAL_SIZE = 1000
SYNTHETIC_BATCHES = 100  # synthetic-imagenet: training steps per epoch unless --synthetic-batches
IMAGENET_WORKERS = 8  # imagenet: DataLoader worker processes per process unless --num-workers
VAL_SPLIT_SEED = 0  # fixed, not --seed: every run of a data set sees the same val split


def dataset_info(name):
    """The `DatasetInfo` of data set `name` (one of `DATASETS`)."""
    return dataset_spec(name).info


def dataset_spec(name):
    """The `DatasetSpec` of data set `name` (one of `DATASETS`)."""
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(SPECS)}")
    return SPECS[name]


def streaming_datasets():
    """The data sets served by loaders from files or a generator, never held on the device whole."""
    return tuple(name for name, spec in SPECS.items() if spec.read is None)
