"""A data set by name: `build_dataset`, the loader of one split, and `run_data`, the data of a training run
(`rkd-fast train`), the same three things for every data set."""

import dataclasses
import warnings

import torch

from .cifar import CIFAR_FILES, load_cifar
from .digits import load_digits
from .imagenet import DALILoader, ImageFolderLoader, image_folder, imagenet_transform
from .info import (CIFAR_VAL_SIZE, IMAGENET_WORKERS, STREAMING_VAL_SIZE, SYNTHETIC_BATCHES, VAL_SPLIT_SEED,
                   dataset_info)
from .loaders import GPULoader, TensorValSet, ValSet
from .splits import stratified_split
from .synthetic import SyntheticImages, SyntheticLoader


def build_dataset(name, data_dir=None, split="train", *, batch_size=128, device=None, seed=0, rank=None,
                  world_size=None, num_workers=8, loader="pytorch", download=False, verify=True, augment=None,
                  num_batches=100):
    """The loader of data set `name` (see `DATASETS`) for `split`, yielding ``(x, y)`` with x in [0, 1].

    digits, cifar10, cifar100: a `GPULoader` on `device` (CIFAR train: crop + flip; digits: no augmentation,
    since flips and crops would change the digits). imagenet: an `ImageFolderLoader` (``loader="pytorch"``)
    or a `DALILoader` (``loader="dali"``) over ``data_dir/{train,val}``. synthetic-imagenet: a
    `SyntheticLoader` of `num_batches` batches. ``batch_size`` is per rank."""
    info = dataset_info(name)
    if split not in info.splits:
        raise ValueError(f"unknown {name} split {split!r}; expected one of {', '.join(info.splits)}")
    train = split == "train"
    if name == "synthetic-imagenet":
        return SyntheticLoader(batch_size, num_batches=num_batches, num_classes=info.num_classes,
                               input_size=info.input_size, seed=seed, device=device, rank=rank, world_size=world_size)
    if name == "digits":
        x, y = load_digits(split)
        return GPULoader(x, y, batch_size, augment=False, shuffle=train, drop_last=False, seed=seed, rank=rank,
                         world_size=world_size, device=device)
    if data_dir is None:
        raise ValueError(f"{name} needs a data directory (data_dir)")
    if name in CIFAR_FILES:
        x, y = load_cifar(data_dir, name, split, verify=verify, download=download)
        return GPULoader(x, y, batch_size, augment=train if augment is None else augment, seed=seed, rank=rank,
                         world_size=world_size, device=device)
    if loader == "dali":
        return DALILoader(data_dir, split, batch_size, num_workers=num_workers, seed=seed, rank=rank,
                          world_size=world_size, device=device)
    if loader != "pytorch":
        raise ValueError(f"loader must be 'pytorch' or 'dali', got {loader!r}")
    return ImageFolderLoader(data_dir, split, batch_size, num_workers=num_workers, seed=seed, rank=rank,
                             world_size=world_size)


def require_data_dir(name, data_dir):
    """ValueError naming what the directory of data set `name` (cifar10, cifar100, imagenet) must hold, when no
    --data-dir was given."""
    if data_dir is not None:
        return
    if name in CIFAR_FILES:
        raise ValueError(f"{name} needs --data-dir DIR (the directory holding {CIFAR_FILES[name]['folder']}/)")
    raise ValueError(f"{name} needs --data-dir DIR: the directory holding train/ and val/, each with one "
                     "sub-directory of images per class (torchvision ImageFolder layout)")


def run_data(cfg, device, ctx):
    """The data of a training run with config `cfg` (a rkd_fast.train.TrainConfig) on rank `ctx` (its ``rank`` and
    ``world_size``, a rkd_fast.train.distributed.Distributed) training on `device`: ``(info, train, val)``.

    info: the run's `DatasetInfo` (imagenet: as many classes as class folders; imagenet and synthetic-imagenet: the
    input size ``image_size``). train: this rank's training batches, ``(x, y)`` with x float in [0, 1], on the
    device (digits, CIFAR, synthetic) or on the host (imagenet: pinned memory when training on CUDA), in
    channels_last when ``cfg.channels_last`` (imagenet: as read); ``len`` (batches per epoch), ``set_epoch(epoch,
    start_batch)``, ``num_samples`` (an epoch's samples over all ranks). Batch k of rank r is the
    ``[r::world_size]`` share of global batch k of an epoch order that depends on (seed, epoch) alone, every sample
    once per epoch (the last global batch may be short), so a checkpoint resumes under any world size with the
    same global batch. val: the split the robust validation attacks, never augmented, a `TensorValSet` or
    `ValSet` (``len``, ``chunks(rank=, world_size=)``; its ``chunk_size`` the one the trainer validates with).

    Model selection uses a val split, never test: digits' own; for CIFAR, which has none, a fixed stratified
    ``val_size`` (default CIFAR_VAL_SIZE) images of train, the rest is train (cropped and flipped on the device);
    imagenet: ``val_size`` images (default STREAMING_VAL_SIZE) of ``data_dir/val``, a fixed stratified subset;
    synthetic-imagenet: ``val_size`` other random images. Both stratified subsets: `stratified_split`, seed
    VAL_SPLIT_SEED, whatever the run's seed. Raises ValueError naming what was expected when the data cannot be
    read (before the run writes anything). Nothing is drawn from the global RNGs."""
    info = dataset_info(cfg.dataset)
    shard = {"seed": cfg.seed, "rank": ctx.rank, "world_size": ctx.world_size}
    if cfg.dataset == "synthetic-imagenet":
        return _synthetic_data(cfg, device, info, shard)
    if cfg.dataset == "imagenet":
        return _imagenet_data(cfg, device, info, shard)
    if cfg.dataset == "digits":
        x, y = load_digits("train")
        x_val, y_val = load_digits("val", device=device)
    else:
        x, y, x_val, y_val = _cifar_train_and_val(cfg, device)
    # drop_last=False: the step count and the short last batch's weighting assume every sample is served. Digits
    # are not augmented (flips and crops would change them).
    train = GPULoader(x, y, cfg.batch_size, augment=cfg.dataset != "digits", shuffle=True, drop_last=False,
                      device=device, channels_last=cfg.channels_last, **shard)
    # The device holds the whole split: chunks of at least 256 samples.
    return info, train, TensorValSet(x_val, y_val, chunk_size=max(cfg.batch_size, 256))


def _cifar_train_and_val(cfg, device):
    """CIFAR's train images (uint8, on the host) and labels less the held-out val split, and the val split (float
    in [0, 1], on `device`)."""
    require_data_dir(cfg.dataset, cfg.data_dir)
    try:
        x, y = load_cifar(cfg.data_dir, cfg.dataset, "train", download=cfg.download)
    except FileNotFoundError as error:  # a bad --data-dir is bad input, like any other option
        raise ValueError(str(error).replace("Pass download=True", "Pass --download")) from error
    train, val = stratified_split(y, cfg.val_size or CIFAR_VAL_SIZE)
    return x[train], y[train], x[val].to(device).float().div_(255), y[val].to(device)


def _synthetic_data(cfg, device, info, shard):
    """synthetic-imagenet: ``synthetic_batches`` steps per epoch (default SYNTHETIC_BATCHES), each on the same
    global batch of random images, a function of the seed alone; the val split is ``val_size`` other random images
    (stream 1 of seed VAL_SPLIT_SEED). The labels are random too: the accuracies mean nothing, the throughput
    does."""
    side = cfg.image_size or info.input_size[0]
    info = dataclasses.replace(info, input_size=(side, side))
    train = SyntheticLoader(cfg.batch_size, num_batches=cfg.synthetic_batches or SYNTHETIC_BATCHES,
                            num_classes=info.num_classes, input_size=info.input_size, device=device,
                            channels_last=cfg.channels_last, **shard)
    val = SyntheticImages(cfg.val_size or STREAMING_VAL_SIZE, num_classes=info.num_classes,
                          input_size=info.input_size, seed=VAL_SPLIT_SEED, stream=1)
    # Made per chunk on the host: chunks of the per-process batch size, which the device already fits.
    return info, train, ValSet(val, chunk_size=cfg.batch_size)


def _imagenet_data(cfg, device, info, shard):
    """imagenet: ``data_dir/train`` and ``data_dir/val`` in torchvision's ImageFolder layout (one sub-directory of
    images per class, the same class folders in both; 1000 for ImageNet, fewer for a subset such as Imagenette).
    Train: random resized crop to ``image_size`` (default 224) and a horizontal flip, by DataLoader workers
    (`ImageFolderLoader`) or NVIDIA DALI (``--loader dali``, `DALILoader`: the same samples, crop boxes and flips,
    resampled by DALI); val: resize to ``image_size · 256/224``, center crop, read by DataLoader workers."""
    require_data_dir(cfg.dataset, cfg.data_dir)
    try:
        import torchvision  # noqa: F401
    except ImportError as error:
        raise ValueError("imagenet is read with torchvision, which is not installed: pip install torchvision") \
            from error
    side = cfg.image_size or info.input_size[0]
    workers = IMAGENET_WORKERS if cfg.num_workers is None else cfg.num_workers
    pin = device.type == "cuda"
    # drop_last=False: the step count and the short last batch's weighting assume every sample is served.
    options = {"num_workers": workers, "drop_last": False, **shard}
    try:
        if cfg.loader == "dali":
            train = DALILoader(cfg.data_dir, "train", cfg.batch_size, size=side, device=device, **options)
        else:
            train = ImageFolderLoader(cfg.data_dir, "train", cfg.batch_size, pin_memory=pin,
                                      transform=imagenet_transform("train", side), **options)
        val_folder = image_folder(cfg.data_dir, "val", imagenet_transform("val", side))
    except (FileNotFoundError, ImportError) as error:  # a bad --data-dir, or --loader dali without DALI
        raise ValueError(str(error)) from error
    classes = train.dataset.classes
    if val_folder.classes != classes:
        missing = sorted(set(classes) - set(val_folder.classes))
        extra = sorted(set(val_folder.classes) - set(classes))
        raise ValueError(f"{val_folder.root} and {train.dataset.root} must hold the same class folders (classes are "
                         f"numbered by their sorted names): val lacks {_some(missing)}, has extra {_some(extra)}")
    info = dataclasses.replace(info, num_classes=len(classes), input_size=(side, side))
    targets = torch.as_tensor(val_folder.targets)
    val_size = cfg.val_size or STREAMING_VAL_SIZE
    indices = stratified_split(targets, val_size)[1] if val_size < len(targets) else None
    if cfg.val_size is not None and cfg.val_size > len(targets):
        warnings.warn(f"--val-size {cfg.val_size}: {val_folder.root} holds {len(targets)} images; the robust "
                      "validation evaluates all of them", RuntimeWarning, stacklevel=2)
    # Read per chunk: chunks of the per-process batch size, which the device already fits.
    return info, train, ValSet(val_folder, indices, chunk_size=cfg.batch_size, num_workers=workers, pin_memory=pin)


def _some(names, shown=5):
    if not names:
        return "none"
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
