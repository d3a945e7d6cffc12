"""A synthetic ImageNet-shaped data set: random images and labels drawn from (seed, sample) alone, to measure the
training step without reading files."""

import torch

from .. import seeding
from .spec import (IMAGENET_MEAN, IMAGENET_STD, STREAMING_VAL_SIZE, SYNTHETIC_BATCHES, VAL_SPLIT_SEED, DatasetInfo,
                   DatasetSpec, register_dataset)
from .loaders import ValSet, check_sharding, distributed_defaults

# Random tensors of ImageNet's shape: measures the training step without reading files.
INFO = DatasetInfo("synthetic-imagenet", 1000, 3, (224, 224), IMAGENET_MEAN, IMAGENET_STD, 4 / 255,
                   ("train", "val"), stem="imagenet")


def synthetic_sample(seed, index, input_size=(224, 224), num_classes=1000, stream=0):
    """Image `index` of a synthetic set: pixels uniform in [0, 1), shape (3, H, W), and a uniform label in
    [0, num_classes), drawn from a CPU generator seeded by (seed, stream, index) alone, so a sample does not
    depend on the batch, rank or world size it is served in. ``stream`` tells sets of the same seed apart
    (the trainer: 0 for train, 1 for val)."""
    generator = seeding.generator(seeding.derive_seed(int(seed), "synthetic", int(stream), int(index)))
    x = torch.rand(3, *input_size, generator=generator)
    return x, torch.randint(0, num_classes, (), generator=generator)


class SyntheticImages(torch.utils.data.Dataset):
    """`num_samples` synthetic images (`synthetic_sample` 0, 1, ...) as a map-style data set: ``(x, y)`` with x
    float (3, H, W) in [0, 1), y a 0-d int64 tensor."""

    def __init__(self, num_samples, *, num_classes=1000, input_size=(224, 224), seed=0, stream=1):
        self.num_samples, self.num_classes, self.input_size = int(num_samples), num_classes, tuple(input_size)
        self.seed, self.stream = seed, stream

    def __len__(self):
        return self.num_samples

    def __getitem__(self, index):
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} synthetic images")
        return synthetic_sample(self.seed, index, self.input_size, self.num_classes, self.stream)


class SyntheticLoader:
    """Random ImageNet-shaped batches, made once on `device` and served `num_batches` times per epoch: the
    cost of a training step without any data loading. Same interface as `GPULoader`.

    The batch is rank `rank`'s ``[rank::world_size]`` share of one global batch of ``batch_size · world_size``
    `synthetic_sample` images (stream 0) of `seed`: a function of the seed alone, whatever the world size."""

    def __init__(self, batch_size, *, num_batches=100, num_classes=1000, input_size=(224, 224), seed=0,
                 device=None, channels_last=True, rank=None, world_size=None):
        rank, world_size = distributed_defaults(rank, world_size)
        check_sharding(batch_size, rank, world_size)
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
        rows = [synthetic_sample(seed, i, input_size, num_classes)
                for i in range(rank, batch_size * world_size, world_size)]
        x = torch.stack([x for x, _ in rows])
        self.x = x.to(device).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.y = torch.stack([y for _, y in rows]).to(device)
        self.num_batches, self.start_batch = num_batches, 0
        self.batch_size, self.world_size = batch_size, world_size

    @property
    def num_samples(self):
        """Samples of an epoch over all ranks (every batch is full)."""
        return self.num_batches * self.batch_size * self.world_size

    def set_epoch(self, epoch, start_batch=0):
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch must be in [0, {self.num_batches}], got {start_batch}")
        self.start_batch = int(start_batch)

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        start, self.start_batch = self.start_batch, 0
        for _ in range(start, self.num_batches):
            yield self.x, self.y


def _loader(split, data_dir=None, *, batch_size=128, device=None, seed=0, rank=None, world_size=None,
            num_batches=100, **_):
    return SyntheticLoader(batch_size, num_batches=num_batches, num_classes=INFO.num_classes,
                           input_size=INFO.input_size, seed=seed, device=device, rank=rank, world_size=world_size)


def _run_data(cfg, device, info, shard):
    """``synthetic_batches`` steps per epoch (default SYNTHETIC_BATCHES), each on the same global batch of random
    images, a function of the seed alone; the val split is ``val_size`` other random images (stream 1 of seed
    VAL_SPLIT_SEED). The labels are random too: the accuracies mean nothing, the throughput does."""
    import dataclasses

    side = cfg.image_size or info.input_size[0]
    info = dataclasses.replace(info, input_size=(side, side))
    train = SyntheticLoader(cfg.batch_size, num_batches=cfg.synthetic_batches or SYNTHETIC_BATCHES,
                            num_classes=info.num_classes, input_size=info.input_size, device=device,
                            channels_last=cfg.channels_last, **shard)
    val = SyntheticImages(cfg.val_size or STREAMING_VAL_SIZE, num_classes=info.num_classes,
                          input_size=info.input_size, seed=VAL_SPLIT_SEED, stream=1)
    # Made per chunk on the host: chunks of the per-process batch size, which the device already fits.
    return info, train, ValSet(val, chunk_size=cfg.batch_size)


# Not evaluated by `rkd-fast eval` (its labels are random).
register_dataset(DatasetSpec(INFO, run_data=_run_data, loader=_loader, eval_split=None,
                             options=("val_size", "image_size", "synthetic_batches"),
                             max_val_size=50_000))  # it stands in for ImageNet, whose val split has 50,000 images
