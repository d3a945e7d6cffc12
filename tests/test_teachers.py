"""load_teacher: model files, and RobustBench specs with a stand-in robustbench module (the real one cannot
download here, and is not importable on this machine)."""

import sys

import pytest
import torch

from rkd_fast.model_file import save_model
from rkd_fast.models import build_model, model_info
from rkd_fast.teachers import load_teacher

from _robustbench_stub import install_robustbench


def test_local_file_round_trip(tmp_path):
    model = build_model("small_cnn", width=4)
    path = save_model(model, tmp_path / "teacher.pt")
    teacher = load_teacher(str(path), num_classes=10)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model.eval()(x))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert {k: model_info(teacher)[k] for k in ("spec", "source", "num_classes")} == \
        {"spec": str(path), "source": "file", "num_classes": 10}
    with pytest.raises(ValueError, match="has 10 classes, but 100"):
        load_teacher(path, num_classes=100)
    with pytest.raises(ValueError, match="'small_cnn', but 'resnet18'"):
        load_teacher(path, arch="resnet18")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(tmp_path / "missing.pt")


def test_robustbench_missing_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "robustbench", None)  # not installed
    monkeypatch.setitem(sys.modules, "robustbench.utils", None)
    with pytest.raises(ImportError, match="pip install git\\+https://github.com/RobustBench/robustbench"):
        load_teacher("robustbench:cifar10/Linf/Addepalli2022Efficient_RN18")


@pytest.fixture
def fake_robustbench(monkeypatch):
    """The robustbench stand-in with a width-4 ResNet-18; the list of its load_model calls."""
    calls = []
    install_robustbench(monkeypatch, lambda: build_model("resnet18", width=4, num_classes=10), calls)
    return calls


def test_robustbench_spec_loads_from_teacher_dir(tmp_path, fake_robustbench):
    reference = build_model("resnet18", width=4, num_classes=10).eval()
    spec = "robustbench:cifar10/Linf/Fake2024_RN18"
    with pytest.raises(FileNotFoundError, match="cannot download.*cifar10/Linf/Fake2024_RN18.pt"):
        load_teacher(spec, teacher_dir=tmp_path)
    assert fake_robustbench == []  # robustbench was not asked to fetch it
    (tmp_path / "cifar10" / "Linf").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "cifar10" / "Linf" / "Fake2024_RN18.pt")
    teacher = load_teacher(spec, teacher_dir=tmp_path, num_classes=10)
    assert fake_robustbench == [("Fake2024_RN18", "cifar10", "Linf", str(tmp_path))]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), reference(x))
    assert model_info(teacher)["source"] == "robustbench" and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="has 10 classes, but 100"):
        load_teacher(spec, teacher_dir=tmp_path, num_classes=100)


@pytest.mark.parametrize("spec, match", [
    ("robustbench:cifar10/Linf", "DATASET/THREAT/NAME"),
    ("robustbench:cifar10//Name", "DATASET/THREAT/NAME"),
    ("robustbench:mnist/Linf/Name", "must be one of cifar10, cifar100, imagenet"),
])
def test_bad_robustbench_spec(spec, match):
    with pytest.raises(ValueError, match=match):
        load_teacher(spec)
