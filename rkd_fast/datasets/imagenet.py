"""ImageNet-style folders (``root/{train,val}/<class>/<image>``): read by DataLoader workers (`ImageFolderLoader`)
or decoded by NVIDIA DALI (`DALILoader`, training batches). Both shard with a `ShardSampler`, and each sample's
random crop and flip are drawn from an RNG seeded by (seed, epoch, sample), so they do not depend on the worker,
rank or world size, and a resumed run replays them."""

import warnings
import contextlib
from pathlib import Path

import torch

from .. import seeding
from .spec import (IMAGENET_MEAN, IMAGENET_STD, IMAGENET_WORKERS, STREAMING_VAL_SIZE, DatasetInfo, DatasetSpec,
                   register_dataset)
from .loaders import ShardSampler, ValSet, distributed_defaults
from .splits import stratified_split

INFO = DatasetInfo("imagenet", 1000, 3, (224, 224), IMAGENET_MEAN, IMAGENET_STD, 4 / 255, ("train", "val"),
                   stem="imagenet")
DATA_DIR = "train/ and val/, each with one sub-directory of images per class (torchvision ImageFolder layout)"


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


# --- the data set's declaration ---------------------------------------------------------------------------------

def _loader(split, data_dir, *, batch_size=128, device=None, seed=0, rank=None, world_size=None, num_workers=8,
            loader="pytorch", **_):
    if loader == "dali":
        return DALILoader(data_dir, split, batch_size, num_workers=num_workers, seed=seed, rank=rank,
                          world_size=world_size, device=device)
    if loader != "pytorch":
        raise ValueError(f"loader must be 'pytorch' or 'dali', got {loader!r}")
    return ImageFolderLoader(data_dir, split, batch_size, num_workers=num_workers, seed=seed, rank=rank,
                             world_size=world_size)


def _import_torchvision():
    try:
        import torchvision  # noqa: F401
    except ImportError as error:
        raise ImportError("imagenet is read with torchvision, which is not installed: pip install torchvision") \
            from error


def _run_data(cfg, device, info, shard):
    """``data_dir/train`` and ``data_dir/val`` in torchvision's ImageFolder layout (one sub-directory of images per
    class, the same class folders in both; 1000 for ImageNet, fewer for a subset such as Imagenette). Train: random
    resized crop to ``image_size`` (default 224) and a horizontal flip, by DataLoader workers (`ImageFolderLoader`)
    or NVIDIA DALI (``--loader dali``, `DALILoader`: the same samples, crop boxes and flips, resampled by DALI);
    val: ``val_size`` images (default STREAMING_VAL_SIZE) of ``data_dir/val``, a fixed stratified subset, resized
    to ``image_size · 256/224`` and center cropped, read by DataLoader workers."""
    import dataclasses

    try:
        _import_torchvision()
    except ImportError as error:
        raise ValueError(str(error)) from error
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


class _Chunks:
    """The batches of a `ValSet` as (x, y), with a length."""

    def __init__(self, val_set, batch_size):
        self.val_set, self.batch_size = val_set, batch_size

    def __len__(self):
        return -(-len(self.val_set) // self.batch_size)

    def __iter__(self):
        for _, x, y in self.val_set.chunks(self.batch_size):
            yield x, y


def _eval_data(split, data_dir, n_examples, *, batch_size, device, image_size, num_workers, subset):
    """As the trainer's validation reads it: resize, center crop to ``image_size`` (default 224), `num_workers`
    DataLoader workers; ``subset(targets)``: the indices to evaluate or None."""
    _import_torchvision()
    folder = image_folder(data_dir, split, imagenet_transform("val", image_size or 224))
    val_set = ValSet(folder, subset(folder.targets), num_workers=num_workers,
                     pin_memory=torch.device(device or "cpu").type == "cuda")
    return _Chunks(val_set, batch_size), len(val_set), len(folder.classes)


register_dataset(DatasetSpec(INFO, run_data=_run_data, loader=_loader, eval_data=_eval_data, eval_split="val",
                             data_dir=DATA_DIR, options=("val_size", "image_size", "num_workers", "loader")))
