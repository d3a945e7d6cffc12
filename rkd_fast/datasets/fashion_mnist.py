"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): 70,000 real 28×28 grayscale photos of clothing in 10 classes,
60,000 train and 10,000 test, read from the four original idx files.

Where the files are found: in ``--data-dir`` (the four files, gzipped or not, in the folder itself or in
torchvision's layout ``DIR/FashionMNIST/raw/``), else in the folder of Debian's package ``dataset-fashion-mnist``
(`DEBIAN_DIR`). ``--download`` fetches them into ``DIR/FashionMNIST/raw/`` with torchvision.

Every file is checked before it is used (magic number, shape, count, length, label range, MD5); a file that fails
is a ValueError of one line naming it. Splits: ``train`` the 60,000 training images (a run holds a fixed stratified
`VAL_SIZE` of them out as its val split), ``test`` the 10,000 test images. Images are uint8 ``(N, 1, 28, 28)``,
labels int64.
"""

import gzip
import hashlib
import zlib
from pathlib import Path

import torch

from .spec import DatasetInfo, DatasetSpec, register_dataset

# Of the 59,000 images of the train split a run trains on (the 60,000 less the default val split), in [0, 1];
# tests/test_fashion_mnist.py recomputes them from the real files.
MEAN = (0.2860,)
STD = (0.3530,)
# L∞ 0.1 on [0, 1] pixels: the radius robustness studies use on Fashion-MNIST.
# robust-kd here: the teacher's soft labels at the clean input, alone, as the target at the student's N-FGSM point.
# Over 5 seeds (docs/frontier.md, Fashion-MNIST) AutoAttack 73.5 ± 0.8 against 67.7 ± 1.6 for digits' defaults
# (the teacher's soft labels and features at x', with CE), which lost to N-FGSM here.
ROBUST_KD_DEFAULTS = {"teacher_at": "clean", "ce_weight": 0.0, "feat_weight": 0.0}
INFO = DatasetInfo("fashion-mnist", 10, 1, (28, 28), MEAN, STD, 0.1, ("train", "test"),
                   method_defaults={"robust-kd": ROBUST_KD_DEFAULTS})

# A run's val split: 1,000 images held out of train (100 per class), like CIFAR's. The robust validation attacks
# all of them at every evaluation, so on a 2-core CPU it must stay a few seconds next to an epoch; 1,000 measures
# accuracy to about ±1.1 points (one standard error near 85%), enough to select a model. Reported numbers use test.
VAL_SIZE = 1000

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # `dpkg -L dataset-fashion-mnist`
TORCHVISION_SUBDIR = Path("FashionMNIST") / "raw"  # where torchvision.datasets.FashionMNIST keeps them

IMAGES, LABELS = 2051, 2049  # the idx magic numbers: unsigned bytes (0x08) in 3 dimensions, in 1
SIDE = 28
# split -> (images file, labels file, images); the names are those of the published files, less ".gz".
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000)}
# The published MD5s. GZ_MD5: of the .gz files, as torchvision lists them (torchvision/datasets/mnist.py, class
# FashionMNIST, `resources`; torchvision 0.29.1). Debian's package recompresses the files (other .gz bytes, the same
# content), so a file is also accepted when the MD5 of its idx bytes is the published content's (CONTENT_MD5,
# listed by other loaders of the data set beside the .gz ones; the Debian package's files match them).
GZ_MD5 = {"train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
          "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
          "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
          "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310"}
CONTENT_MD5 = {"train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
               "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
               "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
               "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965"}

_cache = {}  # (path, size, mtime_ns, ...) -> its checked tensor: the demo and the study read a split many times


def _where(data_dir):
    """The folders searched, in order."""
    if data_dir is None:
        return [DEBIAN_DIR]
    return [Path(data_dir), Path(data_dir) / TORCHVISION_SUBDIR]


def _find(folder, name):
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def not_found_message(data_dir):
    files = ", ".join(f"{name}[.gz]" for images, labels, _ in FILES.values() for name in (images, labels))
    if data_dir is None:
        return (f"Fashion-MNIST not found: install Debian's package (apt-get install dataset-fashion-mnist, which "
                f"puts the four files in {DEBIAN_DIR}), or fetch them with torchvision: --data-dir DIR --download")
    return (f"Fashion-MNIST not found in {data_dir}: expected {files} in {data_dir} or "
            f"{Path(data_dir) / TORCHVISION_SUBDIR}; "
            "pass --download to fetch them there with torchvision, or install Debian's package "
            f"dataset-fashion-mnist ({DEBIAN_DIR}) and give no --data-dir")


def locate(split, data_dir=None):
    """(images path, labels path) of `split`: the first searched folder holding both; FileNotFoundError naming
    both ways to get them otherwise."""
    images, labels, _ = FILES[split]
    for folder in _where(data_dir):
        found = _find(folder, images), _find(folder, labels)
        if all(found):
            return found
    raise FileNotFoundError(not_found_message(data_dir))


def fetch(data_dir):
    """Fetches the four files into ``data_dir/FashionMNIST/raw/`` with torchvision (which checks the .gz MD5s)."""
    if data_dir is None:
        raise ValueError("--download needs --data-dir DIR: torchvision writes the files to DIR/FashionMNIST/raw/")
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError as error:
        raise ImportError("--download fetches Fashion-MNIST with torchvision: pip install torchvision") from error
    FashionMNIST(str(data_dir), train=True, download=True)  # downloads the four files, train's and test's


def _read_bytes(path):
    """(the file's idx bytes, decompressed when it is a .gz, and the MD5 of the file as stored)."""
    raw = path.read_bytes()
    stored_md5 = hashlib.md5(raw).hexdigest()
    if path.suffix != ".gz":
        return raw, stored_md5
    try:
        return gzip.decompress(raw), stored_md5
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError; a cut file an EOFError
        raise ValueError(f"{path}: not a readable gzip file, truncated or corrupt ({error})") from error


def _check_header(path, data, magic, expected_count):
    """The dimensions of the idx file `data`, checked against what `path` must hold."""
    if len(data) < 8:
        raise ValueError(f"{path}: {len(data)} bytes, too short for an idx file (truncated?)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        kind = {IMAGES: "images", LABELS: "labels"}
        if found in kind:
            raise ValueError(f"{path} holds {kind[found]} (idx magic {found}), not {kind[magic]}: are the image and "
                             "label files swapped?")
        raise ValueError(f"{path}: bad magic number {found} (expected {magic}, an idx file of unsigned bytes): "
                         "not a Fashion-MNIST file, or corrupt")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: {len(data)} bytes, too short for its {ndim}-dimension idx header (truncated?)")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if dims[1:] != (SIDE, SIDE)[:ndim - 1]:
        raise ValueError(f"{path}: images of {'×'.join(map(str, dims[1:]))} pixels, expected {SIDE}×{SIDE}")
    if dims[0] != expected_count:
        raise ValueError(f"{path}: {dims[0]} entries, expected {expected_count}")
    size = 1
    for d in dims:
        size *= d
    body = len(data) - header
    if body < size:
        raise ValueError(f"{path}: truncated: {body} bytes of data, the header announces {size}")
    if body > size:
        raise ValueError(f"{path}: {body - size} bytes after the {size} the header announces: corrupt")
    return dims, header


def _read_idx(path, magic, expected_count, verify):
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, magic, expected_count, verify)
    if key in _cache:
        return _cache[key]
    data, stored_md5 = _read_bytes(path)
    dims, header = _check_header(path, data, magic, expected_count)
    values = torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)
    if magic == LABELS and len(values) and int(values.max()) >= INFO.num_classes:
        raise ValueError(f"{path}: labels must lie in [0, {INFO.num_classes}), found up to {int(values.max())}")
    if verify:
        name = path.name[:-3] if path.suffix == ".gz" else path.name
        content_md5 = hashlib.md5(data).hexdigest()
        if stored_md5 != GZ_MD5.get(name) and content_md5 != CONTENT_MD5.get(name):
            raise ValueError(f"{path}: not the published {name} (MD5 of its content {content_md5}, expected "
                             f"{CONTENT_MD5.get(name)}): corrupt or another data set")
    _cache[key] = values
    return values


def read(split, data_dir=None, *, download=False, verify=True):
    """``(x, y)`` of `split` ("train": 60,000, "test": 10,000): x uint8 ``(N, 1, 28, 28)``, y int64 ``(N,)``.

    data_dir: where to look first (see the module docstring); None: Debian's folder. download: fetch the files into
    data_dir with torchvision when they are not found. verify: check the MD5s (the structure is always checked).
    FileNotFoundError when the files are nowhere, ValueError naming the file when one is wrong."""
    if split not in FILES:
        raise ValueError(f"unknown fashion-mnist split {split!r}; expected one of {', '.join(FILES)}")
    try:
        images_path, labels_path = locate(split, data_dir)
    except FileNotFoundError:
        if not download:
            raise
        fetch(data_dir)
        images_path, labels_path = locate(split, data_dir)
    _, _, count = FILES[split]
    x = _read_idx(images_path, IMAGES, count, verify)
    y = _read_idx(labels_path, LABELS, count, verify)
    return x.unsqueeze(1), y.long()


# Not augmented: the objects are centred on a black ground, and the adversarial-training results on the MNIST
# family (and this data set's prototype study) train without crops or flips; 59,000 images are enough for the
# epochs trained here. Needs no --data-dir when Debian's package is installed.
register_dataset(DatasetSpec(INFO, read=read, val_from_train=VAL_SIZE, augment=False, needs_data_dir=False,
                             data_dir=f"the four Fashion-MNIST idx files, or FashionMNIST/raw/ holding them "
                                      f"(default: {DEBIAN_DIR} when installed)",
                             download=True, options=("val_size",), files=locate))
