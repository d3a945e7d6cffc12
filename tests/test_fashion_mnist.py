"""Fashion-MNIST: the idx files in their real format (gzipped and raw, in a folder and in torchvision's layout, in
Debian's folder), every kind of bad file refused in one line naming it before anything is written, the splits a
run trains and validates on, `--download` as a thin call to torchvision, and, when Debian's package is installed,
the real files end to end (their statistics, a short training run and an evaluation)."""

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rkd_fast import datasets
from rkd_fast.cli import main
from rkd_fast.datasets import fashion_mnist as fm
from rkd_fast.train import make_config
from rkd_fast.train.distributed import Distributed

TRAIN, TEST = 40, 20  # images per generated split: 4 and 2 of each class


def _idx(magic, array):
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _split_arrays(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


def _write(folder, name, data, gz):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name + ".gz" if gz else name)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture
def fake_files(monkeypatch, tmp_path):
    """Writes generated files of TRAIN and TEST images: ``make(folder, gz=True) -> {split: (x, y)}``. The module's
    counts and MD5s are those of the generated files; Debian's folder is an empty one."""
    monkeypatch.setattr(fm, "FILES", {"train": (*fm.FILES["train"][:2], TRAIN), "test": (*fm.FILES["test"][:2], TEST)})
    monkeypatch.setattr(fm, "GZ_MD5", {})
    monkeypatch.setattr(fm, "CONTENT_MD5", {})
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian-package")
    monkeypatch.setattr(fm, "_cache", {})

    def make(folder, gz=True):
        arrays = {}
        for i, (split, (images, labels, n)) in enumerate(fm.FILES.items()):
            x, y = _split_arrays(n, i)
            for name, data in ((images, _idx(fm.IMAGES, x)), (labels, _idx(fm.LABELS, y))):
                _write(folder, name, data, gz)
                fm.CONTENT_MD5[name] = hashlib.md5(data).hexdigest()
            arrays[split] = (torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y).long())
        return arrays
    return make


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("layout", ["folder", "torchvision"])
def test_reads_both_layouts_gzipped_or_not(tmp_path, fake_files, gz, layout):
    root = tmp_path / "data"
    arrays = fake_files(root / fm.TORCHVISION_SUBDIR if layout == "torchvision" else root, gz=gz)
    for split, (x, y) in arrays.items():
        got_x, got_y = datasets.open_split("fashion-mnist", split, root)
        assert got_x.dtype == torch.uint8 and got_x.shape == (len(y), 1, 28, 28) and got_y.dtype == torch.int64
        assert torch.equal(got_x, x) and torch.equal(got_y, y)


def test_debian_folder_is_used_without_data_dir(tmp_path, fake_files, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "debian")
    arrays = fake_files(tmp_path / "debian")
    x, y = datasets.open_split("fashion-mnist", "test")
    assert torch.equal(x, arrays["test"][0]) and torch.equal(y, arrays["test"][1])


def test_missing_files_name_both_ways_to_get_them(tmp_path, fake_files, capsys):
    with pytest.raises(FileNotFoundError) as error:
        datasets.open_split("fashion-mnist", "train")
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--download" in message and "\n" not in message
    out = tmp_path / "run"
    for extra in ([], ["--data-dir", str(tmp_path / "empty")]):
        assert main(["train", "--dataset", "fashion-mnist", "--method", "natural", "--out", str(out),
                     "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Fashion-MNIST not found" in err and "--download" in err
        assert not out.exists()


def _corrupt(kind, folder):
    """Spoils one file the way `kind` says; returns the path the error must name."""
    images = folder / "train-images-idx3-ubyte"
    labels = folder / "train-labels-idx1-ubyte"
    if kind == "bad magic":
        data = bytearray(images.read_bytes())
        data[2:4] = b"\x09\x99"
        images.write_bytes(bytes(data))
    elif kind == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
    elif kind == "truncated gz":
        gz = folder / "train-images-idx3-ubyte.gz"
        gz.write_bytes(gzip.compress(images.read_bytes())[:-50])
        images.unlink()
        return gz
    elif kind == "trailing bytes":
        images.write_bytes(images.read_bytes() + b"\0" * 10)
    elif kind == "wrong count":
        x, y = _split_arrays(TRAIN - 1, 0)
        images.write_bytes(_idx(fm.IMAGES, x))
    elif kind == "wrong shape":
        images.write_bytes(_idx(fm.IMAGES, np.zeros((TRAIN, 27, 27), np.uint8)))
    elif kind == "label out of range":
        data = bytearray(labels.read_bytes())
        data[-1] = 10
        labels.write_bytes(bytes(data))
        return labels
    elif kind == "md5 mismatch":
        data = bytearray(images.read_bytes())
        data[-1] ^= 1  # one pixel: the file is still well formed
        images.write_bytes(bytes(data))
    elif kind == "swapped":
        swap = folder / "swap"
        images.rename(swap)
        labels.rename(images)
        swap.rename(labels)
    return images


CORRUPTIONS = {"bad magic": "bad magic number", "truncated": "truncated", "truncated gz": "not a readable gzip",
               "trailing bytes": "bytes after", "wrong count": f"{TRAIN - 1} entries, expected {TRAIN}",
               "wrong shape": "27×27 pixels, expected 28×28", "label out of range": "labels must lie in [0, 10)",
               "md5 mismatch": "not the published", "swapped": "swapped"}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_bad_file_is_one_line_naming_it(tmp_path, fake_files, kind):
    fake_files(tmp_path, gz=False)
    path = _corrupt(kind, tmp_path)
    with pytest.raises(ValueError) as error:
        datasets.open_split("fashion-mnist", "train", tmp_path)
    message = str(error.value)
    assert str(path) in message and CORRUPTIONS[kind] in message and "\n" not in message
    datasets.open_split("fashion-mnist", "test", tmp_path)  # the other split's files are fine


def test_md5_is_checked_for_gzipped_files_and_can_be_skipped(tmp_path, fake_files):
    fake_files(tmp_path, gz=True)
    gz = tmp_path / "t10k-labels-idx1-ubyte.gz"
    y = np.frombuffer(gzip.decompress(gz.read_bytes())[8:], np.uint8).copy()
    y[0] = (y[0] + 1) % 10
    gz.write_bytes(gzip.compress(_idx(fm.LABELS, y)))
    with pytest.raises(ValueError, match="not the published t10k-labels-idx1-ubyte"):
        datasets.open_split("fashion-mnist", "test", tmp_path)
    assert datasets.open_split("fashion-mnist", "test", tmp_path, verify=False)[1][0] == int(y[0])


def test_a_bad_file_stops_the_cli_before_anything_is_written(tmp_path, fake_files, capsys):
    fake_files(tmp_path / "data", gz=False)
    _corrupt("truncated gz", tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "fashion-mnist", "--method", "natural", "--data-dir", str(tmp_path / "data"),
                 "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train-images-idx3-ubyte.gz" in err and not out.exists()
    assert main(["eval", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--split", "train",
                 "--arch", "small_cnn", "--weights", str(tmp_path / "none.pt")]) == 2


def test_run_data_holds_out_a_stratified_val_split_unaugmented(tmp_path, fake_files):
    arrays = fake_files(tmp_path)
    cfg = make_config(method="natural", dataset="fashion-mnist", data_dir=str(tmp_path), val_size=10, batch_size=8)
    info, train, val = datasets.run_data(cfg, torch.device("cpu"), Distributed(rank=0, world_size=1))
    x, y = arrays["train"]
    assert info.input_size == (28, 28) and info.eps == 0.1 and info.mean == fm.MEAN
    assert train.num_samples == TRAIN - 10 and len(val) == 10
    assert train.x.dtype == torch.uint8  # pixels stay uint8 on the device until a batch is made
    _, _, y_val = next(val.chunks())
    assert torch.equal(y_val.bincount(minlength=10), torch.ones(10, dtype=torch.int64))  # stratified
    train_index, _ = datasets.stratified_split(y, 10)
    train.set_epoch(0)
    order = train._plan()[0]
    xb, yb = next(iter(train))
    assert xb.dtype == torch.float32 and torch.equal(yb, y[train_index][order[:8]])
    assert torch.equal(xb, x[train_index][order[:8]].float() / 255)  # not cropped or flipped
    with pytest.raises(ValueError, match="--download needs --data-dir"):
        datasets.open_split("fashion-mnist", "train", download=True)


def test_download_is_torchvisions(tmp_path, fake_files, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    calls = []

    class FakeFashionMNIST:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            fake_files(Path(root) / fm.TORCHVISION_SUBDIR, gz=True)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    x, y = datasets.open_split("fashion-mnist", "test", tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True)] and len(y) == TEST
    datasets.open_split("fashion-mnist", "train", tmp_path, download=True)  # on disk now: no second download
    assert len(calls) == 1


# --- the real files (Debian's package dataset-fashion-mnist) ---------------------------------------------------

def _real_files_or_skip():
    found = [fm._find(fm.DEBIAN_DIR, name) for images, labels, _ in fm.FILES.values() for name in (images, labels)]
    if not all(found):
        pytest.skip(f"Fashion-MNIST's files are not in {fm.DEBIAN_DIR} (apt-get install dataset-fashion-mnist)")


def test_real_files_statistics_match_dataset_info():
    _real_files_or_skip()
    x, y = datasets.open_split("fashion-mnist", "train")
    assert len(y) == 60000 and torch.equal(y.bincount(), torch.full((10,), 6000))
    train, _ = datasets.stratified_split(y, fm.VAL_SIZE)
    pixels = x[train].double() / 255
    assert (round(pixels.mean().item(), 4),) == fm.MEAN
    assert (round(pixels.std(unbiased=False).item(), 4),) == fm.STD
    assert len(datasets.open_split("fashion-mnist", "test")[1]) == 10000


@pytest.mark.slow
def test_real_files_train_and_evaluate(tmp_path, capsys):
    _real_files_or_skip()
    pytest.importorskip("pyautoattack")
    from rkd_fast import save_model, train_model

    # A few steps on a fixed 3,000-image subset, a one-step robust validation of the 1,000 val images.
    result = train_model(dataset="fashion-mnist", method="natural", width=4, epochs=2, batch_size=250,
                         train_size=3000, attack_steps=1, device="cpu", progress=False)
    assert result.model.rkd_info["kwargs"]["input_size"] == [28, 28]
    save_model(result.model, tmp_path / "model.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "model.pt"), "--dataset", "fashion-mnist",
                 "--n-examples", "100", "--attacks", "clean", "fgsm", "--device", "cpu",
                 "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["n_examples"] == 100 and report["config"]["split"] == "test"
    assert report["results"]["clean"] > 0.5  # one epoch learns the classes (chance is 0.1)


# --- a data set is one declaration ----------------------------------------------------------------------------

@pytest.fixture
def toy_dataset():
    """A fourth small data set, declared as a data set module would: 12×12 RGB images, val held out of train."""
    info = datasets.DatasetInfo("toy", 3, 3, (12, 12), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 0.05, ("train", "test"))

    def read(split, data_dir=None, *, download=False, verify=True):
        generator = torch.Generator().manual_seed(0 if split == "train" else 1)
        n = 60 if split == "train" else 30
        return torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=generator), torch.arange(n) % 3

    datasets.register_dataset(datasets.DatasetSpec(info, read=read, val_from_train=6, options=("val_size",)))
    yield info
    del datasets.SPECS["toy"], datasets.DATASETS["toy"]


def test_a_new_data_set_is_one_declaration(toy_dataset):
    from rkd_fast import train_model

    result = train_model(dataset="toy", method="fgsm-rs", width=2, epochs=1, batch_size=16, val_size=9,
                         device="cpu", progress=False)
    assert result.train_seconds > 0 and result.best["val_robust_acc"] >= 0
    with pytest.raises(ValueError, match="--download fetches"):
        make_config(method="natural", dataset="toy", download=True)
    kwargs = result.model.rkd_info["kwargs"]
    assert kwargs["input_size"] == [12, 12] and kwargs["in_channels"] == 3
    batches, n, classes = datasets.eval_data("toy", n_examples=12)
    x, y = next(iter(batches))
    assert (n, classes) == (12, 3) and x.shape[1:] == (3, 12, 12) and x.dtype == torch.float32
    assert datasets.eval_splits()["toy"] == "test"


def test_small_cnn_is_sized_from_its_input():
    from rkd_fast.models import build_model

    digits = build_model("small_cnn", width=4)
    assert [tuple(p.shape) for p in digits.parameters()] == \
        [tuple(p.shape) for p in build_model("small_cnn", width=4, input_size=(8, 8)).parameters()]
    assert digits.head[1].in_features == 4 * 4 * 2 * 2
    model = build_model("small_cnn", width=4, input_size=(28, 28))
    assert model.head[1].in_features == 4 * 4 * 7 * 7 and model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="at least 4×4"):
        build_model("small_cnn", input_size=(3, 3))
