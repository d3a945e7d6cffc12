"""An evaluation must not report robustness a model does not have: a model of other input channels is refused,
gradient tricks are caught by the sanity check (finite differences and gradient-free queries), a list of gradient
attacks alone carries a warning, and a model blind to its input is a warning, not a crash."""

import json
import warnings

import pytest
import torch
from torch import nn

import rkd_fast
from _digits_model import EPS
from rkd_fast.attacks import sanity
from rkd_fast.attacks.cli import _check_input_shape
from rkd_fast.attacks.evaluate import gradient_only
from rkd_fast.attacks.sanity import GradientMaskingWarning, GradientMismatchWarning, sanity_check
from rkd_fast.cli import main
from rkd_fast.models import InputNormalization, build_model


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def batch(digits_test):
    return digits_test[0][:128], digits_test[1][:128]


class ReversedGradient(nn.Module):
    """The right logits with the gradient reversed: 2·l.detach() − l."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        logits = self.model(x)
        return 2 * logits.detach() - logits


class TinyRandomGradient(nn.Module):
    """The right logits; when the input requires grad, a tiny random gradient instead of the true one."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        logits = self.model(x)
        if x.requires_grad:
            logits = logits.detach() + 1e-6 * (x * torch.randn_like(x)).flatten(1).sum(1, keepdim=True)
        return logits


class Constant(nn.Module):
    """Outputs that do not depend on the input."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(-1, 1, 10))

    def forward(self, x):
        return self.bias.expand(len(x), 10)


@pytest.mark.parametrize("trick", [ReversedGradient, TinyRandomGradient], ids=["reversed", "tiny-random"])
def test_gradient_tricks_are_flagged(robust_model, batch, trick):
    x, y = batch
    with pytest.warns(GradientMismatchWarning, match="finite difference of the loss disagrees"):
        assert "gradient_mismatch" in sanity_check(trick(robust_model), x, y, eps=EPS)
    with pytest.warns(GradientMismatchWarning):  # evaluate runs it on the first batch, before the attacks
        rkd_fast.evaluate(trick(robust_model), (x, y), attacks=["clean", "pgd5"], eps=EPS)


def test_gradient_free_queries_flag_a_reversed_gradient_without_finite_differences(robust_model, batch, monkeypatch):
    x, y = batch
    monkeypatch.setattr(sanity, "FD_MEASURABLE", float("inf"))  # no sample can tell by finite differences
    with pytest.warns(GradientMismatchWarning, match="random queries of the eps = 0.1 ball raise"):
        sanity_check(ReversedGradient(robust_model), x, y, eps=EPS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientMismatchWarning)
        assert sanity_check(robust_model, x, y, eps=EPS) == []


@pytest.mark.parametrize("norm, eps", [("linf", EPS), ("l2", 0.5)])
def test_honest_models_pass_the_gradient_checks(robust_model, batch, norm, eps):
    x, y = batch
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientMismatchWarning)
        assert sanity_check(robust_model, x, y, eps=eps, norm=norm) == []
        assert sanity_check(build_model("small_cnn", width=4).eval(), x, y, eps=eps, norm=norm) == []


def test_a_model_blind_to_its_input_is_a_warning_not_an_error(batch):
    x, y = batch
    with pytest.warns(GradientMaskingWarning, match="do not depend on the input"):
        results = rkd_fast.evaluate(Constant(), (x, y), attacks=["clean", "fgsm", "pgd5", "cw5"], eps=EPS)
    assert results["pgd5"] == results["clean"]


def test_only_gradient_attacks_carry_a_warning(tmp_path, robust_model, capsys):
    assert gradient_only(["clean", "pgd20"]) and gradient_only(["fgsm", "cw20", "autoattack-rand"])
    assert gradient_only(["clean", "autoattack:apgd-ce+apgd-t"])
    assert not gradient_only(["clean", "pgd20", "autoattack"]) and not gradient_only(["autoattack:apgd-ce+square"])
    assert not gradient_only(["clean"])  # nothing attacked, nothing claimed
    path = rkd_fast.save_model(robust_model, tmp_path / "m.pt")
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(path), "--dataset", "digits", "--attacks", "clean", "pgd5",
                 "--n-examples", "40", "--out", str(out), "--no-progress"]) == 0
    shown = capsys.readouterr().out
    assert "warning: only gradient attacks ran (pgd5)" in shown
    report = json.loads((out / "eval.json").read_text())
    assert any(w.startswith("only gradient attacks ran") for w in report["warnings"])


def test_the_sanity_warnings_reach_eval_json(tmp_path, robust_model):
    # A tricked model is code, not a model file: the CLI loads the honest file, wrapped by a patched loader.
    import rkd_fast.attacks.cli as eval_cli

    saved = rkd_fast.save_model(robust_model, tmp_path / "m.pt")
    real = eval_cli._load_model

    def tricked(*args, **kwargs):
        loaded, description = real(*args, **kwargs)
        return ReversedGradient(loaded), description

    out = tmp_path / "eval"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(eval_cli, "_load_model", tricked)
        assert main(["eval", "--checkpoint", str(saved), "--dataset", "digits", "--attacks", "clean", "pgd5",
                     "--n-examples", "60", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert any(w.startswith("GradientMismatchWarning: ") for w in report["warnings"])


def test_a_model_of_other_input_channels_is_refused_before_attacking(tmp_path, capsys):
    rgb = build_model("small_cnn", width=4, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3)
    path = rkd_fast.save_model(rgb, tmp_path / "rgb.pt")
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(path), "--dataset", "digits", "--attacks", "clean", "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "the model takes 3-channel inputs" in err and "1 channel(s)" in err and "\n" not in err
    assert not out.exists()
    # without rkd_fast's record of it: the normalisation, or the first convolution, says so
    plain = nn.Sequential(InputNormalization([0.5] * 3, [0.25] * 3), nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(ValueError, match="3-channel inputs \\(its input normalisation\\)"):
        _check_input_shape(plain, (1, 8, 8), "digits test")
    with pytest.raises(ValueError, match="3-channel inputs \\(its first convolution\\)"):
        _check_input_shape(nn.Sequential(nn.Conv2d(3, 4, 3)), (1, 8, 8), "digits test")
    _check_input_shape(nn.Sequential(InputNormalization([0.5], [0.25]), nn.Conv2d(1, 4, 3)), (1, 8, 8), "digits")
