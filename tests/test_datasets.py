"""CIFAR / ImageNet loading on tiny generated data in the real on-disk formats, and GPULoader's determinism,
sharding and augmentation (checked against torch.nn.functional.pad + slicing)."""

import copy
import hashlib
import pickle
import sys
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rkd_fast import datasets
from rkd_fast.datasets import GPULoader, ShardSampler, build_dataset, dataset_info, load_cifar


def _write_batch(path, data, labels, label_key=b"labels"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"generated", label_key: labels.tolist(), b"data": data}, f, protocol=2)


def _make_cifar10(root, per_batch=6, test=8, seed=0):
    """cifar-10-batches-py with five train batches and a test batch of random images; returns the arrays."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    arrays = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        _write_batch(folder / name, data, labels)
        arrays[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072}, f, protocol=2)
    return arrays


def _make_cifar100(root, n_train=10, n_test=4):
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    arrays = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100, n)
        _write_batch(folder / name, data, labels, label_key=b"fine_labels")
        arrays[name] = (data, labels)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"x"] * 100}, f, protocol=2)
    return arrays


# --- CIFAR reading -----------------------------------------------------------------------------------------

def test_cifar10_round_trip(tmp_path):
    arrays = _make_cifar10(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, y = load_cifar(tmp_path, "cifar10", "train")
        xt, yt = load_cifar(tmp_path, "cifar10", "test")
    data = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = np.concatenate([arrays[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert x.dtype == torch.uint8 and x.shape == (30, 3, 32, 32)
    assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(labels))
    # Row layout: 1024 red values, then green, then blue, each row-major.
    assert torch.equal(x[4, 1, 2, 7], torch.tensor(data[4, 1024 + 2 * 32 + 7]))
    assert torch.equal(x.reshape(30, -1), torch.from_numpy(data))
    assert xt.shape == (8, 3, 32, 32) and torch.equal(yt, torch.from_numpy(arrays["test_batch"][1]))


def test_cifar100_reads_fine_labels(tmp_path):
    arrays = _make_cifar100(tmp_path)
    x, y = load_cifar(tmp_path, "cifar100", "train", verify=False)
    assert x.shape == (10, 3, 32, 32)
    assert torch.equal(y, torch.from_numpy(arrays["train"][1]))
    assert torch.equal(x.reshape(10, -1), torch.from_numpy(arrays["train"][0]))


def test_md5_mismatch_warns_once(tmp_path):
    _make_cifar10(tmp_path)
    with pytest.warns(UserWarning, match="not the published cifar10 file") as record:
        load_cifar(tmp_path, "cifar10", "test")
    assert len(record) == 2  # test_batch and batches.meta, each named once
    folder = tmp_path / "cifar-10-batches-py"
    assert sorted(str(w.message).split()[0] for w in record) == [str(folder / "batches.meta"), str(folder / "test_batch")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second read does not warn again
        load_cifar(tmp_path, "cifar10", "test")


def test_md5_match_is_trusted_and_verify_false_is_silent(tmp_path, monkeypatch):
    _make_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    files = copy.deepcopy(datasets.CIFAR_FILES)
    spec = files["cifar10"]
    # Make the generated files "the published ones" by recording their real md5s.
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    spec["train"] = [(name, md5[name]) for name, _ in spec["train"]]
    spec["meta"] = ("batches.meta", md5["batches.meta"])
    monkeypatch.setattr(datasets.cifar, "CIFAR_FILES", files)  # the table load_cifar reads
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, _ = load_cifar(tmp_path, "cifar10", "train")
        load_cifar(tmp_path, "cifar10", "test", verify=False)  # test_batch's md5 differs, but verify=False
    assert len(x) == 30


def test_missing_data_dir_names_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*data_batch_1.*data_batch_5.*batches.meta"):
        load_cifar(tmp_path, "cifar10", "train")
    with pytest.raises(FileNotFoundError, match="cifar-100-python.*train, meta"):
        load_cifar(tmp_path, "cifar100", "train")
    _make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: \S*data_batch_3\. Pass"):
        load_cifar(tmp_path, "cifar10", "train", verify=False)
    with pytest.raises(ValueError, match="unknown CIFAR dataset"):
        load_cifar(tmp_path, "cifar1000")
    with pytest.raises(ValueError, match="split"):
        load_cifar(tmp_path, "cifar10", "val")


@pytest.mark.parametrize("content, match", [
    (b"not a pickle at all", "unpickling failed"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), r"shape \(N, 3072\)"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "2 images"),
    (pickle.dumps({b"pixels": np.zeros((2, 3072), np.uint8)}), "expected a dict with b'data'"),
    (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}), r"labels must lie in \[0, 10\)"),
    # A global outside numpy's array reconstruction is refused rather than executed.
    (pickle.dumps(OrderedDict(a=1)), "is not allowed"),
])
def test_malformed_batch_is_a_value_error(tmp_path, content, match):
    _make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_cifar(tmp_path, "cifar10", "test", verify=False)


# --- GPULoader ---------------------------------------------------------------------------------------------

def _images(n=20, size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8), torch.arange(n) % 10


def _epoch(loader, epoch, start_batch=0):
    loader.set_epoch(epoch, start_batch)
    return list(loader)


def test_gpu_loader_unaugmented_is_the_data_in_order():
    x, y = _images()
    loader = GPULoader(x, y, 6, augment=False)  # eval defaults: no shuffle, keep the last partial batch
    batches = _epoch(loader, 0)
    assert len(loader) == len(batches) == 4 and [len(b[1]) for b in batches] == [6, 6, 6, 2]
    xb = torch.cat([b[0] for b in batches])
    assert xb.dtype == torch.float32 and xb.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(xb, x.float() / 255) and torch.equal(torch.cat([b[1] for b in batches]), y)


@pytest.mark.parametrize("padding", ["reflect", "zero"])
def test_gpu_loader_augmentation_matches_pad_crop_flip(padding):
    x, y = _images(n=12, size=8)
    loader = GPULoader(x, y, 5, augment=True, pad=3, padding=padding, seed=7)
    order, offsets, flips = loader._plan()
    batches = _epoch(loader, 0)
    assert len(loader) == len(batches) == 2  # train: shuffled, only full batches
    assert all(b[0].is_contiguous(memory_format=torch.channels_last) for b in batches)
    xb, yb = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    padded = F.pad(x.float(), (3, 3, 3, 3), mode="reflect" if padding == "reflect" else "constant")
    for out, i in zip(xb, order[:10].tolist()):
        dy, dx = offsets[i].tolist()
        want = padded[i, :, dy:dy + 8, dx:dx + 8] / 255
        want = want.flip(-1) if flips[i] else want
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert torch.equal(yb, y[order[:10]])
    assert flips.any() and not flips.all() and len(set(map(tuple, offsets.tolist()))) > 1  # it does vary


def test_gpu_loader_is_deterministic_and_resumable():
    x, y = _images(n=40)
    a = GPULoader(x, y, 8, seed=3)
    b = GPULoader(x.clone(), y.clone(), 8, seed=3)
    first, again = _epoch(a, 2), _epoch(b, 2)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(first, again))
    other = _epoch(a, 3)
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(first, other))
    resumed = _epoch(a, 2, start_batch=3)
    assert len(resumed) == 2
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(first[3:], resumed))
    assert len(list(a)) == 5  # the resume offset applied to one pass only
    with pytest.raises(ValueError, match="start_batch"):
        a.set_epoch(0, start_batch=6)


@pytest.mark.parametrize("drop_last", [True, False])
def test_gpu_loader_shards_match_the_single_process_batch(drop_last):
    x, y = _images(n=23)
    single = _epoch(GPULoader(x, y, 8, seed=5, drop_last=drop_last), 1)
    shards = [_epoch(GPULoader(x, y, 4, seed=5, drop_last=drop_last, rank=r, world_size=2), 1) for r in range(2)]
    full = [(bx, by) for bx, by in single if len(by) == 8]
    assert len(full) == 2 and all(len(s) == (2 if drop_last else 3) for s in shards)
    for k, (bx, by) in enumerate(full):
        # Interleaving rank 0's and rank 1's batch k gives the global batch k, in order.
        sx = torch.stack([shards[0][k][0], shards[1][k][0]], 1).flatten(0, 1)
        sy = torch.stack([shards[0][k][1], shards[1][k][1]], 1).flatten(0, 1)
        assert torch.equal(sx, bx) and torch.equal(sy, by)
    if not drop_last:  # the tail (7 samples) is split 4 / 3 and every sample is seen exactly once
        assert [len(s[2][1]) for s in shards] == [4, 3]
        seen = torch.cat([b[1] for s in shards for b in s])
        assert sorted(seen.tolist()) == sorted(y.tolist())


def test_gpu_loader_argument_checks():
    x, y = _images()
    with pytest.raises(ValueError, match="rank"):
        GPULoader(x, y, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        GPULoader(x, y, 0)
    with pytest.raises(ValueError, match="padding"):
        GPULoader(x, y, 4, padding="edge")
    with pytest.raises(ValueError, match="y"):
        GPULoader(x, y[:-1], 4)
    with pytest.raises(TypeError, match="uint8 or floating"):
        GPULoader(x.int(), y, 4)


def test_build_dataset_augments_only_train(tmp_path):
    _make_cifar10(tmp_path, per_batch=8, test=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        test = build_dataset("cifar10", tmp_path, "test", batch_size=8)
        train = build_dataset("cifar10", tmp_path, "train", batch_size=8, seed=1)
        x_test, _ = load_cifar(tmp_path, "cifar10", "test")
        x_train, y_train = load_cifar(tmp_path, "cifar10", "train")
    xb, _ = next(iter(test))
    assert torch.equal(xb, x_test.float() / 255)
    train.set_epoch(0)
    order = train._plan()[0]
    xb, yb = next(iter(train))
    assert xb.shape == (8, 3, 32, 32) and torch.equal(yb, y_train[order[:8]])
    assert not torch.equal(xb, x_train[order[:8]].float() / 255)  # cropped / flipped
    digits = build_dataset("digits", split="val", batch_size=64)
    xd, _ = next(iter(digits))
    assert xd.shape == (64, 1, 8, 8) and len(digits) == 3


# --- ImageNet, synthetic, info -------------------------------------------------------------------------------

def _make_image_folder(root, n_per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n_per_class):
                pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG", quality=90)


def test_imagenet_folder_loader(tmp_path):
    _make_image_folder(tmp_path)
    val = build_dataset("imagenet", tmp_path, "val", batch_size=4, num_workers=0)
    batches = _epoch(val, 0)
    assert len(val) == 2 and [len(b[1]) for b in batches] == [4, 2]
    x, y = batches[0]
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 0, 0, 1, 1, 1]  # no shuffle, class order
    assert torch.equal(x, _epoch(val, 1)[0][0])  # center crop: no randomness
    train = build_dataset("imagenet", tmp_path, "train", batch_size=2, num_workers=1, seed=0)
    first = _epoch(train, 0)
    assert len(train) == len(first) == 3 and first[0][0].shape == (2, 3, 224, 224)
    assert sorted(torch.cat([b[1] for b in first]).tolist()) == [0, 0, 0, 1, 1, 1]
    assert len(_epoch(train, 0, start_batch=2)) == 1


def test_imagenet_missing_or_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        build_dataset("imagenet", tmp_path, "train", num_workers=0)
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="val"):
        build_dataset("imagenet", tmp_path, "val", num_workers=0)


def test_dali_missing_names_the_package(tmp_path, monkeypatch):
    _make_image_folder(tmp_path, n_per_class=1)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # make `import nvidia.dali` fail
    with pytest.raises(ImportError, match="pip install nvidia-dali-cuda"):
        build_dataset("imagenet", tmp_path, "train", loader="dali")


def test_shard_sampler_matches_single_process():
    single = list(ShardSampler(21, 6, seed=2))
    shards = [list(ShardSampler(21, 3, seed=2, rank=r, world_size=2)) for r in range(2)]
    assert len(single) == 18
    assert [i for pair in zip(*shards) for i in pair] == single


def test_synthetic_imagenet_and_info():
    loader = build_dataset("synthetic-imagenet", split="train", batch_size=2, num_batches=3)
    batches = _epoch(loader, 0)
    assert len(loader) == len(batches) == 3
    assert batches[0][0].shape == (2, 3, 224, 224) and batches[0][1].max() < 1000
    info = dataset_info("cifar100")
    assert (info.num_classes, info.input_size, len(info.mean)) == (100, (32, 32), 3)
    assert dataset_info("imagenet").num_classes == 1000 and dataset_info("digits").in_channels == 1
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_info("mnist")
    with pytest.raises(ValueError, match="split"):
        build_dataset("cifar10", "/nonexistent", "val")


def test_download_only_when_asked(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    calls = []

    def fake_cifar10(root, train, download):  # stands in for the network fetch
        calls.append((root, train, download))
        _make_cifar10(tmp_path)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    with pytest.raises(FileNotFoundError):
        load_cifar(tmp_path, "cifar10", "test")
    assert calls == []
    x, _ = load_cifar(tmp_path, "cifar10", "test", download=True, verify=False)
    assert calls == [(str(tmp_path), True, True)] and len(x) == 8
    load_cifar(tmp_path, "cifar10", "test", download=True, verify=False)  # present now: no second fetch
    assert len(calls) == 1
