"""`rkd-fast demo --quick --all` end to end: results.json keys and ranges, the plot, the saved models.

The run includes the --all baselines (≈ 13 s more than the default run's ≈ 50 s); that the default run trains
exactly MODEL_NAMES, with the same configs, is checked on model_names / training_config directly."""

import json

import pytest
import torch

from rkd_fast.model_file import load_model
from rkd_fast.models import model_info
from rkd_fast.cli import main
from rkd_fast.datasets import load_digits, stratified_subset
from rkd_fast.demo import MODEL_NAMES, model_names, training_config
from rkd_fast.studies import settings as study_settings
from rkd_fast.train.methods import baseline_methods

BASELINE_NAMES = baseline_methods()  # the methods declared baselines
SETTINGS = {"full": study_settings("digits", "demo"), "quick": study_settings("digits", "demo", quick=True)}

# The demo's evaluation runs AutoAttack through pyautoattack (a test dependency `make test` installs).
pytest.importorskip("pyautoattack", reason="the demo evaluates with AutoAttack: pip install pyautoattack")

ACCURACIES = ("clean", "fgsm", "pgd20", "autoattack")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--all", "--out", str(out), "--eps", "0.1", "--no-progress"]) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_results_keys_and_ranges(demo_run):
    _, results = demo_run
    assert results["eps"] == 0.1
    assert list(results["models"]) == list(MODEL_NAMES + BASELINE_NAMES)
    for name, entry in results["models"].items():
        for key in ACCURACIES:
            assert 0.0 <= entry[key] <= 1.0, (name, key, entry[key])
        # Each attack can only lower the accuracy of the samples it attacks (misclassified ones stay wrong).
        assert entry["pgd20"] <= entry["clean"] and entry["fgsm"] <= entry["clean"]
        assert entry["train_seconds"] > 0
    assert results["test_samples"] == SETTINGS["quick"]["test_samples"]
    assert results["autoattack_samples"] == SETTINGS["quick"]["autoattack_samples"]
    # the smoke run's AutoAttack is its first two attacks; the demo itself runs the standard version
    assert results["autoattack_version"] == "apgd-ce+apgd-t" and SETTINGS["full"]["autoattack"] == "standard"
    for key in ("command", "configs", "versions", "git_commit", "stages"):
        assert key in results
    assert results["configs"]["robust-kd"]["method"] == "robust-kd"
    assert results["configs"]["kd"]["teacher"].endswith("teacher.pt")
    for name in BASELINE_NAMES:
        assert results["configs"][name]["method"] == name
    assert results["configs"]["ard"]["teacher"] == results["configs"]["rslad"]["teacher"] \
        == results["configs"]["kd"]["teacher"]
    assert results["configs"]["trades"]["teacher"] is None
    assert "--all" in results["command"]
    for record in results["stages"].values():
        assert record["wall_seconds"] >= 0 and record["cpu_seconds"] >= 0


@pytest.mark.slow
def test_plot_written(demo_run):
    out, _ = demo_run
    png = out / "robustness_vs_cost.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_models_load_and_match_results(demo_run):
    out, results = demo_run
    x, y = load_digits("test")
    keep = stratified_subset(y, SETTINGS["quick"]["test_samples"])
    x, y = x[keep], y[keep]
    for name in MODEL_NAMES + BASELINE_NAMES:
        model = load_model(out / "models" / f"{name}.pt")
        assert model_info(model)["meta"]["name"] == name
        with torch.no_grad():
            clean = (model(x).argmax(1) == y).float().mean().item()
        # The saved weights are the ones evaluated.
        assert clean == pytest.approx(results["models"][name]["clean"], abs=1e-6)


@pytest.mark.slow
def test_refuses_to_overwrite(demo_run, capsys):
    out, _ = demo_run
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_rejects_bad_eps(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "x"), "--eps", "0"]) == 2
    assert "eps" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_all_adds_exactly_the_baselines():
    assert model_names() == MODEL_NAMES
    assert model_names(all_baselines=True) == MODEL_NAMES + ("fgsm-rs", "n-fgsm", "free-at", "ard", "rslad", "trades")
    assert set(BASELINE_NAMES) == {"fgsm-rs", "n-fgsm", "free-at", "trades", "ard", "rslad"}


def test_training_configs_of_the_baselines(tmp_path):
    settings, common, teacher = SETTINGS["full"], {"dataset": "digits", "eps": 0.1}, tmp_path / "teacher.pt"
    student = {k: v for k, v in training_config("pgd-at", settings, common, teacher).items() if k != "method"}
    for name in BASELINE_NAMES:
        cfg = training_config(name, settings, common, teacher)
        assert cfg["method"] == name
        # ard and rslad distil the demo's teacher; trades trains from labels only.
        assert cfg.get("teacher") == (str(teacher) if name in ("ard", "rslad") else None)
        if name == "free-at":  # the same optimizer steps: m replays over the epochs divided by m
            m = cfg.pop("free_replays")
            assert m > 1 and m * cfg["epochs"] == student["epochs"] and cfg["eval_every"] == cfg["epochs"]
            cfg.update(epochs=student["epochs"], eval_every=student["eval_every"])
        # Otherwise the same run as the other students: width, epochs, schedule, data, eps.
        assert {k: v for k, v in cfg.items() if k not in ("method", "teacher")} == student
    assert training_config("teacher", settings, common, teacher)["width"] == settings["teacher_width"]
    assert "teacher" not in training_config("teacher", settings, common, teacher)
