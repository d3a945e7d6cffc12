"""rkd_fast.save_model / load_model: the model file format (round trip, weights_only, atomic saves, bad files)."""

import os

import pytest
import torch
from torch import nn

import rkd_fast
from rkd_fast import atomic
from rkd_fast.models import build_model, model_info


@pytest.fixture
def model():
    model = build_model("small_cnn", width=8, num_classes=7)
    with torch.no_grad():  # weights that differ from a fresh build, so a round trip that ignored them fails
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model.block1[1].running_mean.uniform_()
    return model


def test_round_trip(model, tmp_path):
    path = rkd_fast.save_model(model, tmp_path / "model.pt", epoch=3, method="pgd-at", eps=0.1)
    loaded = rkd_fast.load_model(path)
    assert type(loaded) is type(model) and not loaded.training
    assert model_info(loaded)["arch"] == "small_cnn" and model_info(loaded)["kwargs"] == {"width": 8, "num_classes": 7}
    assert model_info(loaded)["meta"] == {"epoch": 3, "method": "pgd-at", "eps": 0.1}
    assert model_info(loaded)["num_classes"] == 7
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_file_is_plain_and_loads_with_weights_only(model, tmp_path):
    path = rkd_fast.save_model(model, tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "rkd_fast.model" and payload["version"] == 1
    assert payload["arch"] == "small_cnn" and payload["kwargs"] == {"width": 8, "num_classes": 7}
    assert payload["num_classes"] == 7
    assert payload["normalization"]["mean"] == pytest.approx(list(rkd_fast.datasets.DIGITS_MEAN))
    assert payload["normalization"]["std"] == pytest.approx(list(rkd_fast.datasets.DIGITS_STD))
    assert all(t.device.type == "cpu" for t in payload["state_dict"].values())


def test_num_classes_from_the_constructor_default(tmp_path):
    path = rkd_fast.save_model(build_model("small_cnn", width=4), tmp_path / "m.pt")
    assert torch.load(path, weights_only=True)["num_classes"] == 10


def test_load_to_device(model, tmp_path):
    path = rkd_fast.save_model(model, tmp_path / "model.pt")
    loaded = rkd_fast.load_model(path, device="cpu")
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_save_replaces_atomically_and_cleans_up_on_failure(model, tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    rkd_fast.save_model(model, path, version_tag="old")
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(atomic.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        rkd_fast.save_model(model, path, version_tag="new")
    assert path.read_bytes() == before  # the old file is intact
    assert os.listdir(tmp_path) == ["model.pt"]  # and no temporary file is left behind


def test_save_creates_the_directory(model, tmp_path):
    path = rkd_fast.save_model(model, tmp_path / "a" / "b" / "model.pt")
    assert model_info(rkd_fast.load_model(path))["arch"] == "small_cnn"


def test_save_needs_a_registered_model(tmp_path):
    with pytest.raises(ValueError, match="build_model"):
        rkd_fast.save_model(nn.Linear(2, 2), tmp_path / "m.pt")
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        rkd_fast.save_model({"weight": torch.zeros(1)}, tmp_path / "m.pt")


def test_meta_must_be_loadable_with_weights_only(model, tmp_path):
    with pytest.raises(TypeError, match=r"meta\['optimizer'\] is a object"):
        rkd_fast.save_model(model, tmp_path / "m.pt", optimizer=object())
    assert not (tmp_path / "m.pt").exists()


def _save_raw(obj, path):
    torch.save(obj, path)
    return path


class NotAllowed:
    pass


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_bytes(os.urandom(256)) and p, "torch.load"),
    (lambda p: p.write_bytes(b"") is not None and p, "torch.load"),
    (lambda p: _save_raw(build_model("small_cnn", width=4).state_dict(), p), "not an rkd_fast model file"),
    (lambda p: _save_raw([1, 2, 3], p), "not an rkd_fast model file"),
    (lambda p: _save_raw({"format": "rkd_fast.model", "version": 1, "arch": "small_cnn"}, p), "missing kwargs"),
    (lambda p: _save_raw({"x": NotAllowed()}, p), "weights_only"),
], ids=["random-bytes", "empty", "raw-state-dict", "list", "missing-keys", "pickled-class"])
def test_bad_files_are_clear_errors(tmp_path, make, match):
    path = make(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=match):
        rkd_fast.load_model(path)


def _edited(model, tmp_path, **changes):
    path = rkd_fast.save_model(model, tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    torch.save(payload, path)
    return path


def test_newer_version_unknown_arch_and_mismatched_weights(model, tmp_path):
    with pytest.raises(ValueError, match="version 2"):
        rkd_fast.load_model(_edited(model, tmp_path, version=2))
    with pytest.raises(ValueError, match="'vit_huge'.*not registered"):
        rkd_fast.load_model(_edited(model, tmp_path, arch="vit_huge"))
    with pytest.raises(ValueError, match="weights do not fit"):
        rkd_fast.load_model(_edited(model, tmp_path, kwargs={"width": 16, "num_classes": 7}))


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        rkd_fast.load_model(tmp_path / "nope.pt")
