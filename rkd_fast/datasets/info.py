"""What each data set is: its `DatasetInfo` (classes, input shape, normalisation statistics, L∞ radius, splits)
and the defaults a run uses when an option is not given."""

from dataclasses import dataclass

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


DATASETS = {
    "digits": DatasetInfo("digits", 10, 1, (8, 8), DIGITS_MEAN, DIGITS_STD, 0.1, ("train", "val", "test")),
    "cifar10": DatasetInfo("cifar10", 10, 3, (32, 32), CIFAR10_MEAN, CIFAR10_STD, 8 / 255, ("train", "test")),
    "cifar100": DatasetInfo("cifar100", 100, 3, (32, 32), CIFAR100_MEAN, CIFAR100_STD, 8 / 255, ("train", "test")),
    "imagenet": DatasetInfo("imagenet", 1000, 3, (224, 224), IMAGENET_MEAN, IMAGENET_STD, 4 / 255, ("train", "val"),
                            stem="imagenet"),
    # Random tensors of ImageNet's shape: measures the training step without reading files.
    "synthetic-imagenet": DatasetInfo("synthetic-imagenet", 1000, 3, (224, 224), IMAGENET_MEAN, IMAGENET_STD,
                                      4 / 255, ("train", "val"), stem="imagenet"),
}
# The data sets served by loaders from files or a generator, never held on the device whole; their inputs are
# ImageNet-shaped, at any --image-size.
STREAMING_DATASETS = ("imagenet", "synthetic-imagenet")
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
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return DATASETS[name]
