"""CIFAR-10/100 read from torchvision's on-disk format (the pickled batches), checked against the published md5
sums, without unpickling anything but arrays."""

import hashlib
import pickle
import warnings
from pathlib import Path

import torch

from .spec import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, CIFAR_VAL_SIZE, DatasetInfo, DatasetSpec,
                   register_dataset)

INFOS = {
    "cifar10": DatasetInfo("cifar10", 10, 3, (32, 32), CIFAR10_MEAN, CIFAR10_STD, 8 / 255, ("train", "test")),
    "cifar100": DatasetInfo("cifar100", 100, 3, (32, 32), CIFAR100_MEAN, CIFAR100_STD, 8 / 255, ("train", "test")),
}

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
                                f"--download (download=True) to fetch it, or point the data directory at a copy")
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
    num_classes = INFOS[name].num_classes
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{folder}: labels must lie in [0, {num_classes}), found {y.min()}..{y.max()}")
    return torch.from_numpy(x), torch.from_numpy(y)


def _register(name):
    def read(split, data_dir, *, download=False, verify=True):
        return load_cifar(data_dir, name, split, verify=verify, download=download)

    # Cropped and flipped (the standard CIFAR augmentation); no val split of its own: one is held out of train.
    register_dataset(DatasetSpec(INFOS[name], read=read, val_from_train=CIFAR_VAL_SIZE, augment=True,
                                 data_dir=f"{CIFAR_FILES[name]['folder']}/ (torchvision's format)", download=True,
                                 options=("val_size",),
                                 files=lambda split, data_dir, name=name: [
                                     path for path, _ in _cifar_paths(data_dir, name, split)[1]]))


for _name in CIFAR_FILES:
    _register(_name)
