"""ImageNet-style folders (``root/{train,val}/<class>/<image>``): read by DataLoader workers (`ImageFolderLoader`)
or decoded by NVIDIA DALI (`DALILoader`, training batches). Both shard with a `ShardSampler`, and each sample's
random crop and flip are drawn from an RNG seeded by (seed, epoch, sample), so they do not depend on the worker,
rank or world size, and a resumed run replays them."""

import contextlib
from pathlib import Path

import torch

from .. import seeding
from .loaders import ShardSampler, distributed_defaults


def imagenet_transform(split, size=224):
    """The standard ImageNet preprocessing, ending in [0, 1] tensors (the models normalise inside): train a
    random resized crop to ``size`` and a horizontal flip; val a resize of the shorter side to ``size · 256/224``
    (256 for 224) and a center crop to ``size``."""
    from torchvision import transforms

    if split == "train":
        return transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor()])
    return transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size),
                               transforms.ToTensor()])


def image_folder(root, split, transform=None):
    """The torchvision `ImageFolder` of ``root/split`` (``<class>/<image>``; class index = rank of the folder
    name in sorted order), or FileNotFoundError naming the layout expected."""
    from torchvision import datasets

    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageNet {split} split not found: expected a directory {folder} holding one "
                                f"sub-directory of images per class (torchvision ImageFolder layout)")
    try:
        return datasets.ImageFolder(str(folder), transform=transform or imagenet_transform(split))
    except FileNotFoundError as e:  # no class folders, or class folders without images
        raise FileNotFoundError(f"{folder}: {e} (expected {folder}/<class>/<image>.JPEG)") from e


def _sample_seed(seed, epoch, index):
    return seeding.derive_seed(int(seed), "epoch", int(epoch), "sample", int(index))


@contextlib.contextmanager
def _sample_rng(seed, epoch, index):
    """Inside: torch's CPU generator (which torchvision's random transforms draw from) seeded by (seed, epoch,
    index); its state is restored after. The CUDA generators are untouched."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(_sample_seed(seed, epoch, index))
    try:
        yield
    finally:
        torch.set_rng_state(state)


class _EpochKeys(torch.utils.data.Sampler):
    """A `ShardSampler`'s indices as ``(epoch, index)`` keys: the DataLoader workers learn the epoch of each
    sample they load (persistent workers hold a copy of the data set made when they started)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)


class _SeededSamples(torch.utils.data.Dataset):
    """`folder` (an ImageFolder) keyed by ``(epoch, index)``, its transform drawing from the process's CPU RNG
    seeded by (seed, epoch, index), saved and restored around it: a sample's random crop and flip are the same
    whatever the worker, rank or world size that loads it, and a resumed run replays them."""

    def __init__(self, folder, seed):
        self.folder, self.seed = folder, seed

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, key):
        epoch, index = key
        path, target = self.folder.samples[index]
        image = self.folder.loader(path)
        if self.folder.transform is None:
            return image, target
        with _sample_rng(self.seed, epoch, index):
            return self.folder.transform(image), target


class ImageFolderLoader:
    """ImageNet-style ``root/{train,val}/<class>/<image>`` through a `DataLoader` (pinned memory on CUDA
    machines, persistent workers) with a `ShardSampler`; the same interface as `GPULoader`. As there, the order
    and each sample's augmentation (torchvision transforms, which draw from torch's CPU RNG) are functions of
    (seed, epoch, sample) only."""

    def __init__(self, root, split, batch_size, *, num_workers=8, seed=0, rank=None, world_size=None,
                 drop_last=None, transform=None, pin_memory=None):
        if split not in ("train", "val"):
            raise ValueError(f"unknown ImageNet split {split!r}; expected 'train' or 'val'")
        rank, world_size = distributed_defaults(rank, world_size)
        self.dataset = image_folder(root, split, transform)
        train = split == "train"
        self.sampler = ShardSampler(len(self.dataset), batch_size, shuffle=train,
                                    drop_last=train if drop_last is None else drop_last, seed=seed, rank=rank,
                                    world_size=world_size)
        self.seed = seed
        self.loader = torch.utils.data.DataLoader(
            _SeededSamples(self.dataset, seed), batch_size=batch_size, sampler=_EpochKeys(self.sampler),
            num_workers=num_workers, pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
            persistent_workers=num_workers > 0, drop_last=False,  # the sampler already dropped the tail
            generator=torch.Generator())

    @property
    def num_samples(self):
        return len(self.dataset)

    def set_epoch(self, epoch, start_batch=0):
        self.sampler.set_epoch(epoch, start_batch)
        # The workers' own seeds derive from this generator (the transforms are seeded per sample instead).
        self.loader.generator.manual_seed(seeding.derive_seed(int(self.seed), "epoch", int(epoch), "workers",
                                                              self.sampler.rank))

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        yield from self.loader
        self.sampler.start_batch = 0  # a resume offset applies to one pass only


DALI_PIP = "nvidia-dali-cuda120 (or nvidia-dali-cuda130 for CUDA 13)"


def import_dali():
    """(fn, types, pipeline_def, DALIGenericIterator, LastBatchPolicy) of NVIDIA DALI, or ImportError naming the
    package to install."""
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as e:
        raise ImportError(f"loader='dali' needs NVIDIA DALI, which is not installed: pip install {DALI_PIP} "
                          f"(see https://docs.nvidia.com/deeplearning/dali/); or use loader='pytorch'") from e
    return fn, types, pipeline_def, DALIGenericIterator, LastBatchPolicy


class DALILoader:
    """ImageNet training batches decoded, cropped and resized by NVIDIA DALI (nvJPEG on the GPU when `device` is
    CUDA, DALI's CPU decoder otherwise), with `ImageFolderLoader`'s contract: the same `ShardSampler` order and
    sharding, ``set_epoch(epoch, start_batch)``, and each sample's crop box and flip drawn exactly as there
    (torchvision's RandomResizedCrop / RandomHorizontalFlip draws from an RNG seeded by (seed, epoch, sample)),
    so they do not depend on the rank or world size and a resumed run replays them. Only the pixels' resampling
    differs (DALI's antialiased linear resize, not PIL's): a run may switch loaders on --resume.

    Python reads each file and its JPEG header (for the image size the crop box needs); DALI decodes just the
    box (``decoders.image_slice``), resizes it to ``size × size``, flips and converts it to float [0, 1] CHW on
    `device`. Yields ``(x, y)``: x (B, 3, size, size) float32 on `device`, y (B,) int64."""

    def __init__(self, root, split, batch_size, *, size=224, num_workers=8, seed=0, rank=None, world_size=None,
                 drop_last=None, device=None):
        self._dali = import_dali()
        if split != "train":
            raise ValueError(f"the DALI loader serves the train split (random crops); got {split!r}: read val "
                             f"with loader='pytorch'")
        rank, world_size = distributed_defaults(rank, world_size)
        self.dataset = image_folder(root, split)  # the samples and class numbering (no transform runs)
        self.sampler = ShardSampler(len(self.dataset), batch_size, shuffle=True,
                                    drop_last=True if drop_last is None else drop_last, seed=seed, rank=rank,
                                    world_size=world_size)
        self.seed, self.size, self.num_workers = seed, size, max(1, num_workers)
        self.crop, self.flip = imagenet_transform("train", size).transforms[:2]  # their draws, not their pixels
        self.device = torch.device("cpu" if device is None else device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"the DALI loader runs on cpu or cuda, not {self.device}")

    @property
    def num_samples(self):
        return len(self.dataset)

    def set_epoch(self, epoch, start_batch=0):
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self):
        return -(-len(self.sampler) // self.sampler.batch_size)

    def _sample(self, epoch, index):
        """(encoded bytes, crop anchor (top, left), crop shape (h, w), flip, label) of sample `index`."""
        import numpy as np
        from PIL import Image

        path, target = self.dataset.samples[index]
        data = np.fromfile(path, dtype=np.uint8)
        # The draws imagenet_transform("train") makes for this sample, in its order, with its parameters.
        with Image.open(path) as header, _sample_rng(self.seed, epoch, index):  # header only: the size
            top, left, h, w = self.crop.get_params(header, self.crop.scale, self.crop.ratio)
            flip = bool(torch.rand(1) < self.flip.p)  # as RandomHorizontalFlip
        return (data, np.array([top, left], np.int32), np.array([h, w], np.int32), np.array(flip, np.int32),
                np.array(target, np.int64))

    def _batches(self, epoch, indices):
        batch = self.sampler.batch_size
        for start in range(0, len(indices), batch):
            yield tuple(list(column) for column in zip(*(self._sample(epoch, i) for i in indices[start:start + batch])))

    def __iter__(self):
        fn, types, pipeline_def, DALIGenericIterator, LastBatchPolicy = self._dali
        indices = list(self.sampler)
        self.sampler.start_batch = 0  # a resume offset applies to one pass only
        if not indices:
            return
        on_gpu = self.device.type == "cuda"
        device_id = (torch.cuda.current_device() if self.device.index is None else self.device.index) if on_gpu else None
        source = self._batches(self.sampler.epoch, indices)

        # A pipeline per epoch: its source is this epoch's plan, fixed before any batch is prefetched.
        @pipeline_def(batch_size=self.sampler.batch_size, num_threads=self.num_workers, device_id=device_id,
                      seed=self.seed, prefetch_queue_depth=2)
        def pipeline():
            jpegs, anchor, shape, flip, label = fn.external_source(source=source, num_outputs=5, batch=True)
            images = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="HW", device="mixed" if on_gpu else "cpu",
                                             output_type=types.RGB, adjust_orientation=False)  # as PIL: no EXIF turn
            images = fn.resize(images, resize_x=self.size, resize_y=self.size, antialias=True)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=[0.0] * 3,
                                              std=[255.0] * 3, mirror=flip)
            return images, label.gpu() if on_gpu else label

        pipe = pipeline()
        pipe.build()
        iterator = DALIGenericIterator(pipe, ["x", "y"], last_batch_policy=LastBatchPolicy.PARTIAL,
                                       prepare_first_batch=False)
        try:
            for (batch,) in iterator:
                yield batch["x"], batch["y"].view(-1)
        finally:
            del iterator, pipe
