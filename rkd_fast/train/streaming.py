"""The streaming data sets of the trainer: imagenet (an ImageFolder tree, read and augmented by DataLoader
workers) and synthetic-imagenet (random images of ImageNet's shape, to measure throughput). Unlike digits and
CIFAR (config.load_data) they are never held in memory as tensors: `load_streaming` gives a training loader
and a `ValSet` served in chunks.

The training loaders keep the trainer's contract (see the trainer module): batch k of rank r is the
``[r::world_size]`` share of global batch k of an epoch order that depends on (seed, epoch) alone, every sample
once per epoch (the last global batch may be short), and ``set_epoch(epoch, start_batch)`` skips the batches a
resumed run already did, so a checkpoint resumes under any world size with the same global batch. They yield
float [0, 1] batches on the host (imagenet: pinned memory when training on CUDA) or already on the device
(synthetic); the trainer moves them there (non_blocking) and applies channels_last.

imagenet: ``data_dir/train`` and ``data_dir/val`` in torchvision's ImageFolder layout (one sub-directory of
images per class, the same class folders in both). The classes are the class folders: 1000 for ImageNet, fewer
for a subset (ImageNet-100, Imagenette). Train: random resized crop to ``image_size`` (default 224) and a
horizontal flip; val: resize to ``image_size · 256/224``, center crop. The robust validation evaluates
``val_size`` images of val (default STREAMING_VAL_SIZE), a fixed stratified subset (config.stratified_split,
seed VAL_SPLIT_SEED), in chunks of the per-process batch size. Each sample's crop and flip are drawn from an RNG
seeded by (seed, epoch, sample) (rkd_fast.datasets.ImageFolderLoader), so they do not depend on the DataLoader
worker, rank or world size, and a resumed run replays them (``num_workers`` may change on --resume).
``--loader dali`` reads and augments the training images with NVIDIA DALI (rkd_fast.datasets.DALILoader): the
same samples, crop boxes and flips, resampled by DALI; the val split is read as above either way.

On both, a student whose architecture takes a ``stem`` (ResNet-34/50, MobileNetV2) is built with the ImageNet
stem (trainer.Run); a teacher file keeps the stem it was built with.

synthetic-imagenet: ``synthetic_batches`` steps per epoch (default SYNTHETIC_BATCHES), each on the same global
batch of random images, a function of the seed alone (rkd_fast.datasets.SyntheticLoader); the val split is
``val_size`` other random images (stream 1 of seed VAL_SPLIT_SEED). The labels are random too: the accuracies
mean nothing, the throughput does.
"""

import dataclasses
from dataclasses import dataclass

import torch

from . import config
from .config import stratified_split

DATASETS = config.STREAMING_DATASETS


class ValSet:
    """A val split served in chunks for the robust validation: the samples `indices` (default: all) of the
    map-style `dataset` (items ``(x, y)``, x float (C, H, W) in [0, 1]), in that order. Chunk c holds the
    subset's samples ``[c·size, (c+1)·size)``; rank r of N evaluates chunks r, r + N, ... (the split of
    trainer.robust_accuracy), each loaded by a DataLoader of `num_workers` workers started per evaluation."""

    def __init__(self, dataset, indices=None, *, num_workers=0, pin_memory=False):
        self.dataset = dataset
        self.indices = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices)
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def __len__(self):
        return len(self.indices)

    def chunks(self, size, rank=0, world_size=1):
        """This rank's chunks as ``(start, x, y)``: start the position of the chunk's first sample in the
        subset, x (B, C, H, W) and y (B,) on the host."""
        starts = list(range(rank * size, len(self), size * world_size))
        batches = [self.indices[s:s + size].tolist() for s in starts]
        # A generator of its own: the loader's seed draw leaves the process's RNG (the training's) alone.
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, pin_memory=self.pin_memory,
                                             num_workers=min(self.num_workers, len(batches)),
                                             generator=torch.Generator())
        for start, (x, y) in zip(starts, loader):
            yield start, x, y


@dataclass
class StreamingData:
    info: object  # the rkd_fast.datasets.DatasetInfo of the run: its classes and input size
    train: object  # the training loader: len (steps per epoch), set_epoch(epoch, start_batch), iteration
    val: ValSet
    num_train: int  # training samples of an epoch over all ranks


def load_streaming(cfg, device, ctx):
    """The data of a run on a streaming data set (config.STREAMING_DATASETS) for the rank `ctx` (a
    distributed.Distributed) training on `device`. Raises ValueError naming what was expected when the data
    cannot be read (before the run writes anything)."""
    from .. import datasets

    info = datasets.dataset_info(cfg.dataset)
    side = cfg.image_size or info.input_size[0]
    val_size = cfg.val_size or config.STREAMING_VAL_SIZE
    if cfg.dataset == "synthetic-imagenet":
        info = dataclasses.replace(info, input_size=(side, side))
        train = datasets.SyntheticLoader(cfg.batch_size, num_batches=cfg.synthetic_batches or config.SYNTHETIC_BATCHES,
                                         num_classes=info.num_classes, input_size=info.input_size, seed=cfg.seed,
                                         device=device, channels_last=cfg.channels_last, rank=ctx.rank,
                                         world_size=ctx.world_size)
        val = ValSet(datasets.SyntheticImages(val_size, num_classes=info.num_classes, input_size=info.input_size,
                                              seed=config.VAL_SPLIT_SEED, stream=1))
        return StreamingData(info, train, val, train.num_samples)

    if cfg.dataset != "imagenet":
        raise ValueError(f"{cfg.dataset} is not a streaming data set")
    if cfg.data_dir is None:
        raise ValueError("imagenet needs --data-dir DIR: the directory holding train/ and val/, each with one "
                         "sub-directory of images per class (torchvision ImageFolder layout)")
    try:
        import torchvision  # noqa: F401
    except ImportError as error:
        raise ValueError("imagenet is read with torchvision, which is not installed: pip install torchvision") \
            from error
    workers = config.IMAGENET_WORKERS if cfg.num_workers is None else cfg.num_workers
    pin = device.type == "cuda"
    # drop_last=False: the step count and the short last batch's weighting assume every sample is served.
    shard = {"num_workers": workers, "seed": cfg.seed, "rank": ctx.rank, "world_size": ctx.world_size,
             "drop_last": False}
    try:
        if cfg.loader == "dali":
            train = datasets.DALILoader(cfg.data_dir, "train", cfg.batch_size, size=side, device=device, **shard)
        else:
            train = datasets.ImageFolderLoader(cfg.data_dir, "train", cfg.batch_size, pin_memory=pin,
                                               transform=datasets.imagenet_transform("train", side), **shard)
        val_folder = datasets.image_folder(cfg.data_dir, "val", datasets.imagenet_transform("val", side))
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
    indices = stratified_split(targets, val_size)[1] if val_size < len(targets) else None
    val = ValSet(val_folder, indices, num_workers=workers, pin_memory=pin)
    return StreamingData(info, train, val, len(train.dataset))


def _some(names, shown=5):
    if not names:
        return "none"
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
