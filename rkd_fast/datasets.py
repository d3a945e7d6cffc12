"""Data sets beyond the embedded digits: CIFAR-10/100 (read from torchvision's on-disk format, served from the
device by `GPULoader`), ImageNet (ImageFolder + DataLoader, or NVIDIA DALI when installed) and a synthetic
ImageNet-shaped set for benchmarks.

Every loader yields ``(x, y)`` batches with ``x`` float in [0, 1] (the models normalise inside) and ``y`` int64,
and has the same small interface: ``len(loader)`` (batches this rank sees per epoch), ``set_epoch(epoch,
start_batch=0)`` (pick the epoch's order; ``start_batch`` skips the batches a resumed run already did) and
iteration. `build_dataset` picks a loader by data set name; `dataset_info` gives a set's constants.

Sharding follows `torch.utils.data.DistributedSampler`: the epoch's permutation is split ``perm[rank::world_size]``,
so the ranks' batches ``k``, interleaved, are exactly batch ``k`` of a single process whose batch size is
``world_size`` times larger. The order and (`GPULoader`, `ImageFolderLoader`, `DALILoader`) the augmentation of each sample
come from ``(seed, epoch, sample index)`` only, never from the rank or world size.
"""

import contextlib
import hashlib
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data as _digits
from . import seeding
from .models import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD  # one copy of each

# --- data set constants ------------------------------------------------------------------------------------


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


DATASETS = {
    "digits": DatasetInfo("digits", _digits.NUM_CLASSES, 1, (8, 8), tuple(_digits.DIGITS_MEAN),
                          tuple(_digits.DIGITS_STD), 0.1, _digits.SPLITS),
    "cifar10": DatasetInfo("cifar10", 10, 3, (32, 32), CIFAR10_MEAN, CIFAR10_STD,
                           8 / 255, ("train", "test")),
    "cifar100": DatasetInfo("cifar100", 100, 3, (32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            8 / 255, ("train", "test")),
    "imagenet": DatasetInfo("imagenet", 1000, 3, (224, 224), IMAGENET_MEAN, IMAGENET_STD, 4 / 255,
                            ("train", "val")),
    # Random tensors of ImageNet's shape: measures the training step without reading files.
    "synthetic-imagenet": DatasetInfo("synthetic-imagenet", 1000, 3, (224, 224), IMAGENET_MEAN, IMAGENET_STD,
                                      4 / 255, ("train", "val")),
}


def dataset_info(name):
    """The `DatasetInfo` of data set `name` (one of `DATASETS`)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


# --- CIFAR on disk -----------------------------------------------------------------------------------------

# File names and the md5 sums of the published files, as listed by torchvision (torchvision/datasets/cifar.py,
# classes CIFAR10 and CIFAR100: train_list, test_list, meta; checked against torchvision 0.29.1).
CIFAR_FILES = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                  ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                  ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                  ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                  ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")],
        "test": [("test_batch", "40351d587109b95175f43aff81a1287e")],
        "meta": ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        "label_key": b"labels",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": [("train", "16019d7e3df5f24257cddd939b257f8d")],
        "test": [("test", "f0ef6b0ae62326f3e7ffdfab6717acfc")],
        "meta": ("meta", "7973b15100ade9c7d40fb424638fde48"),
        "label_key": b"fine_labels",
    },
}

_warned_md5 = set()  # files already reported as not the published ones (one warning per file per process)
_md5_cache = {}  # (path, size, mtime_ns) -> md5: rereading a split does not rehash 170 MB


def _md5(path):
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _md5_cache:
        digest = hashlib.md5()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _md5_cache[key] = digest.hexdigest()
    return _md5_cache[key]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of bytes, lists, ints and numpy arrays) and refuses every other
    global, so a tampered file cannot run code the way a plain `pickle.load` would let it."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype"),
                ("_codecs", "encode")}  # how Python 3 writes bytes in protocol 2 pickles (the test files)

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _read_batch(path, label_key):
    import numpy as np

    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise ValueError(f"{path} is not a CIFAR batch file: unpickling failed ({type(e).__name__}: {e})") from e
    if not isinstance(entry, dict) or b"data" not in entry or label_key not in entry:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"{path} is not a CIFAR batch file: expected a dict with b'data' and {label_key!r}, "
                         f"got {keys}")
    x = np.asarray(entry[b"data"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {x.dtype} {tuple(x.shape)}")
    y = np.asarray(entry[label_key], dtype=np.int64)
    if y.shape != (x.shape[0],):
        raise ValueError(f"{path}: {x.shape[0]} images but {label_key!r} has shape {tuple(y.shape)}")
    return x, y


def _cifar_paths(root, name, split):
    spec = CIFAR_FILES[name]
    folder = Path(root) / spec["folder"]
    return folder, [(folder / f, md5) for f, md5 in spec[split]] + [(folder / spec["meta"][0], spec["meta"][1])]


def _download_cifar(root, name):
    try:
        from torchvision import datasets
    except ImportError as e:
        raise ImportError("download=True fetches CIFAR with torchvision: pip install torchvision") from e
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    cls(str(root), train=True, download=True)  # fetches and unpacks both splits, checking the archive's md5


def load_cifar(root, name="cifar10", split="train", *, verify=True, download=False):
    """Reads a CIFAR split from torchvision's on-disk layout under `root`:
    ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` or ``cifar-100-python/{train, test,
    meta}``.

    Returns ``(x, y)``: ``x`` uint8 ``(N, 3, 32, 32)``, ``y`` int64 ``(N,)`` (CIFAR-100: the fine labels).
    verify: hash each file and warn (once per file) when it is not the published one; files whose md5 matches
    are trusted. download: when files are missing, fetch them with torchvision first (needs network)."""
    if name not in CIFAR_FILES:
        raise ValueError(f"unknown CIFAR dataset {name!r}; expected one of {', '.join(CIFAR_FILES)}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown {name} split {split!r}; expected 'train' or 'test'")
    folder, files = _cifar_paths(root, name, split)
    if download and not all(p.is_file() for p, _ in files):
        _download_cifar(root, name)
    missing = [str(p) for p, _ in files if not p.is_file()]
    if missing:
        expected = ", ".join(f for f, _ in CIFAR_FILES[name][split]) + ", " + CIFAR_FILES[name]["meta"][0]
        raise FileNotFoundError(f"{name} {split} split not found under {root}: expected {folder}/ holding "
                                f"{expected} (torchvision's format); missing: {', '.join(missing)}. Pass "
                                f"download=True to fetch it, or point the data directory at a copy")
    if verify:
        for path, md5 in files:
            if str(path) not in _warned_md5 and _md5(path) != md5:
                _warned_md5.add(str(path))
                warnings.warn(f"{path} is not the published {name} file (md5 {_md5(path)}, expected {md5}); "
                              f"reading it anyway", stacklevel=2)
    import numpy as np

    parts = [_read_batch(path, CIFAR_FILES[name]["label_key"]) for path, _ in files[:-1]]
    x = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)  # rows hold the R, G, B planes in turn
    y = np.concatenate([p[1] for p in parts])
    num_classes = DATASETS[name].num_classes
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{folder}: labels must lie in [0, {num_classes}), found {y.min()}..{y.max()}")
    return torch.from_numpy(x), torch.from_numpy(y)


# --- epoch order -------------------------------------------------------------------------------------------

def _epoch_generator(seed, epoch):
    # One CPU stream per (seed, epoch): the same on every rank and device (the trainer's epoch_order's).
    return seeding.generator(seeding.derive_seed(int(seed), "epoch", int(epoch)))


def _shard(order, rank, world_size, batch_size, drop_last):
    """This rank's slice of the epoch order. drop_last: keep only complete global batches (batch_size ·
    world_size samples); otherwise every sample exactly once, so shards may differ by one sample."""
    if drop_last:
        order = order[: len(order) // (batch_size * world_size) * batch_size * world_size]
    return order[rank::world_size]


def _check_sharding(batch_size, rank, world_size):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


def _distributed_defaults(rank, world_size):
    # None: take them from the initialised process group, or a single process.
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    return rank, world_size


# --- the device-resident loader ----------------------------------------------------------------------------

class GPULoader:
    """Serves a whole split held on `device` (CUDA, or CPU for tests): no DataLoader workers, no host copies.

    Images are stored once as given (uint8, scaled by 1/255 on the way out, or float already in [0, 1]) in
    channels_last. Each batch is cropped and flipped by one gather on the device: a random H×W window of
    the image padded by `pad` pixels on each side (``padding="reflect"``: mirrored without repeating the edge,
    like ``torch.nn.functional.pad(mode="reflect")``; ``"zero"``: black), then a horizontal flip with
    probability 1/2. The standard CIFAR augmentation (pad 4, random crop, flip); off when ``augment=False``.

    Shuffling, crop offsets and flips come from a CPU generator seeded by ``(seed, epoch)`` and are indexed by
    sample, so a sample's augmentation does not depend on the rank, world size or device."""

    def __init__(self, x, y, batch_size, *, augment=True, shuffle=None, drop_last=None, seed=0, pad=4,
                 padding="reflect", rank=None, world_size=None, device=None, dtype=torch.float32,
                 channels_last=True):
        rank, world_size = _distributed_defaults(rank, world_size)
        _check_sharding(batch_size, rank, world_size)
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"expected x (N, C, H, W) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise TypeError(f"x must be uint8 or floating point, got {x.dtype}")
        if padding not in ("reflect", "zero"):
            raise ValueError(f"padding must be 'reflect' or 'zero', got {padding!r}")
        if not isinstance(pad, int) or pad < 0 or (padding == "reflect" and pad >= min(x.shape[2:])):
            raise ValueError(f"pad must be a non-negative int (below the image size for reflect padding), got {pad!r}")
        device = torch.device(device) if device is not None else x.device
        self.x = x.to(device).contiguous(memory_format=torch.channels_last)
        self.y = y.to(device=device, dtype=torch.int64)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.augment, self.pad, self.padding = augment, pad, padding
        self.shuffle = augment if shuffle is None else shuffle
        self.drop_last = augment if drop_last is None else drop_last
        self.seed, self.dtype, self.channels_last = seed, dtype, channels_last
        self.epoch, self.start_batch = 0, 0

    @property
    def num_samples(self):
        return len(self.y)

    def set_epoch(self, epoch, start_batch=0):
        """The next iteration serves epoch `epoch`, from its batch `start_batch` (a resumed run's position)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _plan(self):
        """(this rank's sample indices in order, per-sample crop offsets (N, 2), per-sample flips (N,))."""
        n = self.num_samples
        gen = _epoch_generator(self.seed, self.epoch)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=gen)
        flips = torch.randint(0, 2, (n,), generator=gen, dtype=torch.bool)
        return _shard(order, self.rank, self.world_size, self.batch_size, self.drop_last), offsets, flips

    def __len__(self):
        n = len(_shard(torch.arange(self.num_samples), self.rank, self.world_size, self.batch_size, self.drop_last))
        return -(-n // self.batch_size)

    def _source_index(self, offset, flip, size):
        """Index (B, size) into the unpadded image for each output row/column, and whether it hits padding."""
        pos = torch.arange(size, device=offset.device)
        pos = torch.where(flip[:, None], size - 1 - pos, pos) if flip is not None else pos.expand(len(offset), -1)
        src = offset[:, None] - self.pad + pos
        if self.padding == "reflect":
            src = src.abs()  # -k -> k
            src = torch.where(src > size - 1, 2 * (size - 1) - src, src)  # size-1+k -> size-1-k
            return src, None
        inside = (src >= 0) & (src < size)
        return src.clamp(0, size - 1), inside

    def _batch(self, index, offsets, flips):
        x_nhwc = self.x.permute(0, 2, 3, 1)  # a view: x is channels_last
        _, h, w, _ = x_nhwc.shape
        if self.augment:
            rows, row_in = self._source_index(offsets[index, 0], None, h)
            cols, col_in = self._source_index(offsets[index, 1], flips[index], w)
            out = x_nhwc[index[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
            if row_in is not None:  # zero padding: blank the pixels that came from outside the image
                out = out * (row_in[:, :, None] & col_in[:, None, :])[..., None].to(out.dtype)
        else:
            out = x_nhwc[index]
        out = out.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last
        out = out.to(self.dtype) / 255 if self.x.dtype == torch.uint8 else out.to(self.dtype)
        if not self.channels_last:
            out = out.contiguous()
        return out, self.y[index]

    def __iter__(self):
        # The epoch's plan goes to the device once, so the batches below never wait on a host copy.
        order, offsets, flips = (t.to(self.x.device) for t in self._plan())
        start = self.start_batch
        self.start_batch = 0  # a resume offset applies to one pass only
        for b in range(start, len(self)):
            yield self._batch(order[b * self.batch_size:(b + 1) * self.batch_size], offsets, flips)


# --- ImageNet ----------------------------------------------------------------------------------------------

class ShardSampler(torch.utils.data.Sampler):
    """`DistributedSampler`'s sharding with `GPULoader`'s order (same (seed, epoch) permutation) and a
    ``start_batch`` so a resumed run skips, without loading, the batches it already did."""

    def __init__(self, num_samples, batch_size, *, shuffle=True, drop_last=True, seed=0, rank=0, world_size=1):
        _check_sharding(batch_size, rank, world_size)
        self.num_samples, self.batch_size, self.shuffle, self.drop_last = num_samples, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _indices(self):
        n = self.num_samples
        order = torch.randperm(n, generator=_epoch_generator(self.seed, self.epoch)) if self.shuffle else torch.arange(n)
        return _shard(order, self.rank, self.world_size, self.batch_size, self.drop_last)

    def __len__(self):
        return max(0, len(self._indices()) - self.start_batch * self.batch_size)

    def __iter__(self):
        return iter(self._indices()[self.start_batch * self.batch_size:].tolist())


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
        rank, world_size = _distributed_defaults(rank, world_size)
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
        rank, world_size = _distributed_defaults(rank, world_size)
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


# --- synthetic ---------------------------------------------------------------------------------------------

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
        rank, world_size = _distributed_defaults(rank, world_size)
        _check_sharding(batch_size, rank, world_size)
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


# --- by name -----------------------------------------------------------------------------------------------

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
        x, y = _digits.load_digits(split)
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
