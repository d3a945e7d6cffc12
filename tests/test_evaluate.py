"""rkd_fast.evaluate, the sanity checks and `rkd-fast eval` end to end."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import rkd_fast
from _digits_model import EPS
from rkd_fast.attacks import (EvaluationWarning, GradientMaskingWarning, ProbabilityOutputWarning,
                              RandomizedModelWarning, parse_attack, sanity_check)
from rkd_fast.attacks.evaluate import run_evaluation
from rkd_fast.cli import main
from rkd_fast.datasets import load_digits, stratified_split
from rkd_fast.models import build_model

pyautoattack = pytest.importorskip("pyautoattack")
torchattacks = pytest.importorskip("torchattacks")
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.slow
def test_default_attacks_on_a_robust_model(robust_model, digits_test):
    x, y = digits_test[0][:50], digits_test[1][:50]  # AutoAttack standard (with FAB-T and Square) on 50 samples: ~25 s
    results = rkd_fast.evaluate(robust_model, (x, y), eps=EPS)
    assert list(results) == ["clean", "fgsm", "pgd20", "cw20", "autoattack", "worst_case"]
    assert all(0 <= acc <= 1 for acc in results.values())
    assert results["clean"] > 0.9 and results["autoattack"] > 0.3  # meaningful, not trivially 0
    assert all(results["worst_case"] <= acc for name, acc in results.items())
    assert results["autoattack"] <= results["pgd20"] + 0.005
    assert results["pgd20"] <= results["fgsm"] + 0.005 and results["fgsm"] <= results["clean"]


def test_worst_case_is_the_intersection(robust_model, digits_test):
    x, y = digits_test
    only_clean = rkd_fast.evaluate(robust_model, (x, y), attacks=["clean"], eps=EPS)
    assert only_clean["worst_case"] == only_clean["clean"]
    # Every attack's accuracy already requires the clean prediction to be right, so with one attack the
    # worst case is that attack's accuracy; with two it lies between the union bound and the smaller.
    two = rkd_fast.evaluate(robust_model, (x, y), attacks=["fgsm", "cw5"], eps=EPS)
    assert two["worst_case"] <= min(two["fgsm"], two["cw5"])
    assert two["worst_case"] >= two["fgsm"] + two["cw5"] - only_clean["clean"] - 1e-9
    one = rkd_fast.evaluate(robust_model, (x, y), attacks=["pgd5"], eps=EPS)
    assert one["worst_case"] == one["pgd5"]


def test_step_counts_are_parsed(robust_model, digits_test):
    x, y = digits_test
    results = rkd_fast.evaluate(robust_model, (x, y), attacks=["pgd1", "pgd10"], eps=EPS)
    assert results["pgd10"] < results["pgd1"]  # more steps find more adversarials on this robust model
    assert parse_attack("pgd50") == ("pgd", 50) and parse_attack("cw7") == ("cw", 7)
    assert parse_attack("autoattack") == ("autoattack", "standard")
    assert parse_attack("autoattack-plus") == ("autoattack", "plus")
    assert parse_attack("autoattack-rand", "l2") == ("autoattack", "rand")
    assert parse_attack("autoattack:apgd-ce+square") == ("autoattack", ("apgd-ce", "square"))


def test_iterable_of_batches_equals_the_pair(robust_model, digits_test):
    x, y = digits_test
    attacks = ["clean", "fgsm", "pgd3"]
    pair = rkd_fast.evaluate(robust_model, (x, y), attacks=attacks, eps=EPS, batch_size=100)
    batches = [(x[i:i + 100], y[i:i + 100]) for i in range(0, len(x), 100)]
    assert rkd_fast.evaluate(robust_model, batches, attacks=attacks, eps=EPS, batch_size=100) == pair
    assert rkd_fast.evaluate(robust_model, iter(batches), attacks=attacks, eps=EPS) == pair  # no len() either


def test_bf16_evaluation_matches_fp32(robust_model, digits_test):
    attacks = ["pgd20", "cw20"]
    fp32 = rkd_fast.evaluate(robust_model, digits_test, attacks=attacks, eps=EPS)
    bf16 = rkd_fast.evaluate(robust_model, digits_test, attacks=attacks, eps=EPS, precision="bf16")
    for name in attacks:
        assert abs(bf16[name] - fp32[name]) <= 0.01, name


def test_model_state_restored_after_evaluate(digits_test):
    model = build_model("small_cnn", width=4).train()
    rkd_fast.evaluate(model, (digits_test[0][:16], digits_test[1][:16]), attacks=["clean", "pgd2"], eps=EPS,
                      sanity_checks=False)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs, error, match", [
    ({"attacks": ["pgd"]}, ValueError, "unknown attack 'pgd'"),
    ({"attacks": ["pgd0"]}, ValueError, "unknown attack 'pgd0'"),
    ({"attacks": ["square"]}, ValueError, "unknown attack 'square'"),
    ({"attacks": "pgd20"}, TypeError, "list of attack names"),
    ({"attacks": []}, TypeError, "list of attack names"),
    ({"attacks": ["fgsm", "fgsm"]}, ValueError, "twice"),
    ({"eps": -0.1}, ValueError, "eps must be > 0"),
    ({"eps": 0}, ValueError, "eps must be > 0"),  # names eps, not the step eps/4 derived from it
    ({"eps": float("nan")}, ValueError, "eps must be > 0 and finite"),
    ({"norm": "l1"}, ValueError, "unknown norm 'l1'"),
    ({"attacks": ["fgsm"], "norm": "l2"}, ValueError, "fgsm is an L∞ attack"),
    ({"attacks": ["autoattack:apgd-ce+pgd"]}, ValueError, "bad custom AutoAttack"),
    ({"attacks": ["autoattack:apgd-ce+apgd-ce"]}, ValueError, "bad custom AutoAttack"),
    ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
    ({"precision": "int8"}, ValueError, "unknown precision"),
    ({"seed": "0"}, TypeError, "seed must be an int"),
], ids=lambda value: str(value) if isinstance(value, dict) else None)
def test_bad_arguments(digits_test, kwargs, error, match):
    model = build_model("small_cnn", width=4)
    kwargs = {"eps": EPS, **kwargs}
    with pytest.raises(error, match=match):
        rkd_fast.evaluate(model, (digits_test[0][:4], digits_test[1][:4]), **kwargs)


def test_bad_data(digits_test):
    model = build_model("small_cnn", width=4)
    x, y = digits_test
    with pytest.raises(ValueError, match="no samples"):
        rkd_fast.evaluate(model, [], attacks=["clean"], eps=EPS)
    with pytest.raises(ValueError, match="same number of samples"):
        rkd_fast.evaluate(model, (x, y[:-1]), attacks=["clean"], eps=EPS)
    with pytest.raises(TypeError, match="iterable of"):
        rkd_fast.evaluate(model, [x, x, x], attacks=["clean"], eps=EPS)
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        rkd_fast.evaluate(model, (x * 16, y), attacks=["clean"], eps=EPS)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("sanity_checks", [True, False])
def test_non_finite_inputs_in_any_batch_are_refused(robust_model, digits_test, value, sanity_checks):
    # NaN compares false with both bounds: without the check it scored as class 0 (10%), never an error.
    x, y = digits_test[0].clone(), digits_test[1]
    x[300, 0, 3, 4] = value  # in the second batch of 256: the first batch's sanity checks never see it
    with pytest.raises(ValueError, match=r"x holds 1 NaN or infinite value"):
        rkd_fast.evaluate(robust_model, (x, y), attacks=["clean"], eps=EPS, sanity_checks=sanity_checks)


@pytest.mark.parametrize("label", [99, 10, -1])
@pytest.mark.parametrize("sanity_checks", [True, False])
def test_labels_of_every_batch_are_checked(robust_model, digits_test, label, sanity_checks):
    # y[256:] = 99 used to drop clean accuracy from 96% to 69% without a word; with sanity_checks=False nothing
    # was checked at all.
    x, y = digits_test[0], digits_test[1].clone()
    y[256:] = label
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, 10\).*got values in \[{label}, {label}\]"):
        rkd_fast.evaluate(robust_model, (x, y), attacks=["clean"], eps=EPS, sanity_checks=sanity_checks)
    batches = [(x[:256], y[:256]), (x[256:], y[256:])]  # an iterable of batches is checked the same way
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        rkd_fast.evaluate(robust_model, batches, attacks=["clean", "fgsm"], eps=EPS, sanity_checks=sanity_checks)


def test_run_evaluation_reports_seconds_and_samples(robust_model, digits_test):
    x, y = digits_test[0][:100], digits_test[1][:100]
    evaluation = run_evaluation(robust_model, (x, y), attacks=["clean", "fgsm", "pgd5"], eps=EPS, batch_size=40)
    assert evaluation.n_examples == 100 and set(evaluation.seconds) == {"clean", "fgsm", "pgd5"}
    assert all(seconds > 0 for seconds in evaluation.seconds.values())
    assert evaluation.seconds["pgd5"] > evaluation.seconds["clean"]  # five forward-backward passes vs one forward
    assert evaluation.accuracy == rkd_fast.evaluate(robust_model, (x, y), attacks=["clean", "fgsm", "pgd5"], eps=EPS,
                                                    batch_size=40)


# --- L2: the same cross-checks as L∞ (test_attacks), through evaluate ------------------------------------------

EPS_L2 = 0.8  # about the L2 size of an L∞ 0.1 perturbation of 64 pixels


def test_l2_pgd_matches_torchattacks(robust_model, digits_test):
    x, y = digits_test
    ours = rkd_fast.evaluate(robust_model, (x, y), attacks=["clean", "pgd10"], eps=EPS_L2, norm="l2")
    torch.manual_seed(0)  # torchattacks draws its random start from the global RNG
    x_theirs = torchattacks.PGDL2(robust_model, eps=EPS_L2, alpha=EPS_L2 / 4, steps=10, random_start=True)(x, y)
    with torch.no_grad():
        theirs = ((robust_model(x_theirs).argmax(1) == y) & (robust_model(x).argmax(1) == y)).float().mean().item()
    assert 0.3 < ours["pgd10"] < ours["clean"]  # a meaningful comparison: neither 0 nor the clean accuracy
    assert abs(ours["pgd10"] - theirs) <= 0.02
    # On 64 pixels the L∞ ball of 0.1 lies inside the L2 ball of 0.8: L2 PGD finds at least as many adversarials
    # (and an L∞ attack of radius 0.8, the norm ignored, would have left next to nothing above).
    assert ours["pgd10"] <= rkd_fast.evaluate(robust_model, (x, y), attacks=["pgd10"], eps=EPS_L2 / 8)["pgd10"] + 0.01


@pytest.mark.slow
def test_l2_autoattack_matches_pyautoattack(robust_model, digits_test):
    x, y = digits_test[0][:100], digits_test[1][:100]
    attacks = ["apgd-ce", "apgd-t"]
    ours = rkd_fast.evaluate(robust_model, (x, y), attacks=["clean", "autoattack:" + "+".join(attacks)], eps=EPS_L2,
                             norm="l2", batch_size=100)
    direct = pyautoattack.AutoAttack(robust_model, norm="L2", eps=EPS_L2, version="custom", attacks=attacks, seed=0)
    x_direct, _ = direct.run_standard_evaluation(x, y, batch_size=100)
    with torch.no_grad():
        theirs = (robust_model(x_direct).argmax(1) == y).float().mean().item()
    assert abs(ours["autoattack:apgd-ce+apgd-t"] - theirs) <= 0.01
    assert ours["autoattack:apgd-ce+apgd-t"] <= rkd_fast.evaluate(robust_model, (x, y), attacks=["pgd20"], eps=EPS_L2,
                                                                  norm="l2")["pgd20"] + 0.01
    assert (x_direct - x).flatten(1).norm(dim=1).max() <= EPS_L2 + 1e-4


# --- sanity checks -----------------------------------------------------------------------------------------

class Noisy(nn.Module):
    """Randomised: noise on the input in eval mode too."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x + 0.05 * torch.randn_like(x))


class Quantised(nn.Module):
    """Gradient masking: rounding the input to 0/1 makes the input gradient zero everywhere."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x))  # round's derivative is zero


@pytest.mark.parametrize("wrap, warning", [
    (Noisy, RandomizedModelWarning),
    (Quantised, GradientMaskingWarning),
    (lambda m: nn.Sequential(m, nn.Softmax(dim=1)), ProbabilityOutputWarning),
], ids=["randomized", "zero-gradients", "probabilities"])
def test_sanity_checks_warn(robust_model, digits_test, wrap, warning):
    suspicious = wrap(robust_model)
    x, y = digits_test[0][:64], digits_test[1][:64]
    with pytest.warns(warning):
        sanity_check(suspicious, x, y)
    with pytest.warns(warning):  # evaluate runs them on its first batch
        rkd_fast.evaluate(suspicious, (x, y), attacks=["clean"], eps=EPS)
    assert issubclass(warning, EvaluationWarning)


def test_sanity_checks_pass_on_a_plain_model(robust_model, digits_test):
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationWarning)
        assert sanity_check(robust_model, digits_test[0][:64], digits_test[1][:64]) == []


# --- rkd-fast eval ------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def model_file(robust_model, tmp_path_factory):
    return rkd_fast.save_model(robust_model, tmp_path_factory.mktemp("model") / "robust.pt", method="pgd-at", eps=EPS)


def test_eval_cli_end_to_end(model_file, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["eval", "--checkpoint", str(model_file), "--dataset", "digits", "--n-examples", "60",
               "--attacks", "clean", "fgsm,pgd5", "cw5", "--eps", str(EPS), "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "robust accuracy on 60 samples" in printed and "pgd5" in printed and "worst_case" in printed
    report = json.loads((out / "eval.json").read_text())
    assert report["config"]["attacks"] == ["clean", "fgsm", "pgd5", "cw5"]
    assert report["config"]["n_examples"] == 60 and report["config"]["split"] == "test"
    assert report["command"].startswith("rkd-fast eval --checkpoint")
    assert report["model"]["arch"] == "small_cnn" and report["model"]["meta"]["method"] == "pgd-at"
    assert set(report["results"]) == {"clean", "fgsm", "pgd5", "cw5", "worst_case"}
    assert {"torch", "rkd_fast", "pyautoattack", "python"} <= set(report["versions"])
    assert "git_commit" in report
    # RobustBench's field names; no AutoAttack in the list, so no AutoAttack accuracy
    assert (report["dataset"], report["threat_model"], report["eps"], report["n_examples"]) == \
        ("digits", "Linf", EPS, 60)
    assert report["clean_acc"] == report["results"]["clean"] and report["autoattack_acc"] is None
    assert report["worst_case"] == report["results"]["worst_case"] and set(report["seconds"]) == {"clean", "fgsm",
                                                                                                   "pgd5", "cw5"}
    # --n-examples: the fixed class-stratified subset (6 of each digit), through the same evaluate
    x, y = load_digits("test")
    subset = stratified_split(y, 60)[1]
    assert torch.bincount(y[subset]).tolist() == [6] * 10
    expected = rkd_fast.evaluate(rkd_fast.load_model(model_file), (x[subset], y[subset]),
                                 attacks=["clean", "fgsm", "pgd5", "cw5"], eps=EPS)
    assert report["results"] == expected


def test_eval_cli_shows_a_progress_bar_per_attack(model_file, capsys):
    assert main(["eval", "--checkpoint", str(model_file), "--dataset", "digits", "--n-examples", "20",
                 "--attacks", "clean,fgsm,pgd2"]) == 0
    err = capsys.readouterr().err
    assert all(f"{name:>12}" in err for name in ("clean", "fgsm", "pgd2"))


def test_eval_cli_rejects_a_bad_attack_name(model_file, capsys):
    assert main(["eval", "--checkpoint", str(model_file), "--dataset", "digits", "--attacks", "pgdx"]) == 2
    assert "unknown attack 'pgdx'" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_cli_as_a_process(model_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "rkd_fast", "eval", "--checkpoint", str(model_file),
                             "--dataset", "digits", "--n-examples", "20", "--attacks", "clean", "fgsm",
                             "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["config"]["n_examples"] == 20
