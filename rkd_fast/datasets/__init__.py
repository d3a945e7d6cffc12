"""The data sets: the embedded digits, Fashion-MNIST (the idx files, from Debian's package or --data-dir),
CIFAR-10/100 (read from torchvision's on-disk format), all served from the device by `GPULoader`, ImageNet
(ImageFolder + DataLoader, or NVIDIA DALI when installed) and a synthetic
ImageNet-shaped set for benchmarks.

Every loader yields ``(x, y)`` batches with ``x`` float in [0, 1] (the models normalise inside) and ``y`` int64,
and has the same small interface: ``len(loader)`` (batches this rank sees per epoch), ``set_epoch(epoch,
start_batch=0)`` (pick the epoch's order; ``start_batch`` skips the batches a resumed run already did),
``num_samples`` and iteration. A data set is one module that declares itself (`register_dataset`: its
`DatasetInfo` and `DatasetSpec`); `open_split` reads a split, `build_dataset` gives a split's loader, `run_data` a
training run's data, `eval_data` what `rkd-fast eval` attacks, `dataset_info` a set's constants, all by name.

Sharding follows `torch.utils.data.DistributedSampler`: the epoch's permutation is split ``perm[rank::world_size]``,
so the ranks' batches ``k``, interleaved, are exactly batch ``k`` of a single process whose batch size is
``world_size`` times larger. The order and (`GPULoader`, `ImageFolderLoader`, `DALILoader`) the augmentation of each sample
come from ``(seed, epoch, sample index)`` only, never from the rank or world size.

Modules: `info` (DatasetInfo, DatasetSpec, the registry and the run defaults), one per data set (`digits`,
`cifar`, `fashion_mnist`, `imagenet`, `synthetic`; registered in that order), `loaders` (sharded batches and val
splits), `splits` (fixed stratified subsets), `run` (by name).
"""

# The data set modules register themselves on import; their order is DATASETS' order.
from . import digits, cifar, fashion_mnist, imagenet, synthetic  # noqa: F401  (isort: skip)
from .cifar import CIFAR_FILES, load_cifar
from .digits import load_digits
from .imagenet import DALI_PIP, DALILoader, ImageFolderLoader, image_folder, imagenet_transform, import_dali
from .spec import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, CIFAR_VAL_SIZE, DATASETS, DIGITS_MEAN,
                   DIGITS_STD, IMAGENET_MEAN, IMAGENET_STD, IMAGENET_WORKERS, LOADERS, SPECS, STREAMING_VAL_SIZE,
                   SYNTHETIC_BATCHES, VAL_SPLIT_SEED, DatasetInfo, DatasetSpec, dataset_info, dataset_spec,
                   register_dataset, streaming_datasets)
from .loaders import GPULoader, ShardSampler, TensorValSet, ValSet
from .run import build_dataset, eval_data, eval_splits, open_split, require_data_dir, run_data
from .splits import stratified_split, stratified_subset
from .synthetic import SyntheticImages, SyntheticLoader, synthetic_sample

STREAMING_DATASETS = streaming_datasets()

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "CIFAR_FILES", "CIFAR_VAL_SIZE",
           "DALI_PIP", "DATASETS", "DatasetSpec", "SPECS", "dataset_spec", "eval_data", "eval_splits", "open_split",
           "register_dataset", "streaming_datasets", "DIGITS_MEAN", "DIGITS_STD", "DALILoader", "DatasetInfo", "GPULoader",
           "IMAGENET_MEAN", "IMAGENET_STD", "IMAGENET_WORKERS", "ImageFolderLoader", "LOADERS", "STREAMING_DATASETS",
           "STREAMING_VAL_SIZE", "SYNTHETIC_BATCHES", "ShardSampler", "SyntheticImages", "SyntheticLoader",
           "TensorValSet", "VAL_SPLIT_SEED", "ValSet", "build_dataset", "dataset_info", "image_folder",
           "imagenet_transform", "import_dali", "load_cifar", "load_digits", "require_data_dir", "run_data",
           "stratified_split", "stratified_subset", "synthetic_sample"]
