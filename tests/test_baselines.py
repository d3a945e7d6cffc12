"""The baselines trades, ard and rslad (rkd_fast.train.methods): short runs on digits, each loss against a direct
computation on a fixed batch, the shared KL inner maximisation, and the validation of their options."""

import math

import pytest
import torch
from _digits_model import FAST_TRAINING, digits_batch, tiny_cnn

from rkd_fast.cli import main
from rkd_fast.train import make_config, train_model
from rkd_fast.attacks.attacks import kl_attack
from rkd_fast.train.methods import build_method

FAST = {**FAST_TRAINING, "epochs": 1, "attack_steps": 2, "deterministic": True}


def _kl(p, log_q):
    """KL(p ‖ q) per sample, written out."""
    return (p * (p.log() - log_q)).sum(dim=1)


FP32_EPS = torch.finfo(torch.float32).eps


def _kl_rounding(p, log_q):
    """A bound on the float32 rounding error of a method's KL(p ‖ q) per sample, summed over classes: each term
    p·(log p − log q) carries about an ulp of log p and of log q (log_softmax rounds the scaled logit, the
    log-sum-exp and their difference), and the sum over classes cancels the terms' first-order parts, so the
    error scales with Σ p·(|log p| + |log q|), not with the KL (at ARD's T = 30 the KL is ~1e-4 of that sum)."""
    return 2 * FP32_EPS * (p * (p.log().abs() + log_q.abs())).sum(dim=1)


@pytest.mark.parametrize("method", ["trades", "ard", "rslad"])
def test_one_epoch_on_digits(method, teacher_file):
    teacher = {"teacher": str(teacher_file)} if method != "trades" else {}
    result = train_model(method=method, **teacher, **FAST)
    row = result.metrics[0]
    assert math.isfinite(row["train_total"]) and row["train_total"] > 0
    assert 0.0 <= row["val_robust_acc"] <= row["val_clean_acc"] + 1e-9 <= 1.0 + 1e-9


def _method(name, teacher=None, **options):
    student = tiny_cnn(0)
    cfg = make_config(method=name, teacher="unused.pt" if teacher is not None else None, eps=0.1, alpha=0.03,
                      attack_steps=3, **options)
    x, _ = digits_batch(16, seed=3)
    import contextlib
    return build_method(cfg, student, teacher, x[:4], contextlib.nullcontext), student


@pytest.mark.cross_path
@pytest.mark.parametrize("name,options", [("trades", {}), ("trades", {"trades_beta": 2.5}), ("ard", {}),
                                          ("ard", {"ard_alpha": 0.7, "ard_temperature": 4.0}), ("rslad", {})])
def test_loss_matches_direct_computation(name, options):
    teacher = tiny_cnn(5).eval() if name != "trades" else None
    method, student = _method(name, teacher, **options)
    x, y = digits_batch(16, seed=3)
    student.train()
    state = {k: v.clone() for k, v in student.state_dict().items()}
    total, terms = method(x, y, 123)
    student.load_state_dict(state)  # undo the BatchNorm updates, so the same adversarial batch comes back

    from rkd_fast.attacks import pgd
    with torch.no_grad():
        t_logits = teacher(x) if teacher is not None else None
    if name == "ard":
        x_adv = pgd(student, x, y, 0.1, 0.03, 3, random_start=True, seed=123)
    else:
        student.eval()
        with torch.no_grad():
            target = (t_logits if teacher is not None else student(x)).softmax(1)
        student.train()
        x_adv = kl_attack(student, x, target, 0.1, 0.03, 3, seed=123)
    assert student.training and (x_adv - x).abs().max() <= 0.1 + 1e-6
    # The oracle in float64 from the same float32 logits: its own rounding is negligible, and the tolerance is the
    # float32 rounding of the method's computation (never a figure tuned on one CPU).
    s_adv, s_nat = (z.detach().double() for z in (student(x_adv), student(x)))
    t_logits = t_logits.double() if t_logits is not None else None
    ce = -s_nat.log_softmax(1).gather(1, y[:, None]).mean()
    ce_rounding = 4 * FP32_EPS * (ce.abs() + s_nat.abs().amax(1).mean() + 1)
    if name == "trades":
        beta = options.get("trades_beta", 6.0)
        p, log_q = s_nat.softmax(1), s_adv.log_softmax(1)
        expected = ce + beta * _kl(p, log_q).mean()
        tolerance = ce_rounding + beta * _kl_rounding(p, log_q).mean()
    elif name == "ard":
        t, a = options.get("ard_temperature", 30.0), options.get("ard_alpha", 1.0)
        p, log_q = (t_logits / t).softmax(1), (s_adv / t).log_softmax(1)
        kd = _kl(p, log_q).sum() / (x.shape[0] * 10)
        expected = a * t * t * kd + (1 - a) * ce
        tolerance = a * t * t * _kl_rounding(p, log_q).sum() / (x.shape[0] * 10) + (1 - a) * ce_rounding
    else:
        p = t_logits.softmax(1)
        terms_ = [(w, s.log_softmax(1)) for w, s in ((5 / 6, s_adv), (1 / 6, s_nat))]
        expected = sum(w * _kl(p, log_q).mean() for w, log_q in terms_) / 10
        tolerance = sum(w * _kl_rounding(p, log_q).mean() for w, log_q in terms_) / 10
    # The bound must stay far below the value, or the check would say nothing (ARD at T = 30: about 1%).
    assert tolerance < 0.05 * expected.abs()
    torch.testing.assert_close(total.detach().double(), expected, rtol=0, atol=float(tolerance))
    assert terms["total"] == total.detach() and total.requires_grad


@pytest.mark.parametrize("own_prediction", [True, False])
def test_kl_attack_increases_its_objective(own_prediction):
    model = tiny_cnn(0, width=8)
    model.train()
    x, _ = digits_batch(32, seed=3)
    model.eval()
    with torch.no_grad():  # TRADES: the model's own clean prediction; RSLAD: another model's (a teacher's)
        target = (model(x) if own_prediction else tiny_cnn(5).eval()(x)).softmax(1)
    model.train()

    def objective(z):
        with torch.no_grad():
            model.eval()
            value = _kl(target, model(z).log_softmax(1)).sum()
            model.train()
        return value

    before = objective(x)
    x_adv = kl_attack(model, x, target, 0.1, 0.02, 10, seed=0)
    assert objective(x_adv) > before + 1e-3
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    # The student's mode and parameters are left as they were; no gradient was written to them.
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    torch.testing.assert_close(kl_attack(model, x, target, 0.1, 0.02, 10, seed=0), x_adv)  # seeded start


@pytest.mark.parametrize("options,message", [
    (dict(method="ard"), "needs a teacher"),
    (dict(method="rslad"), "needs a teacher"),
    (dict(method="trades", teacher="t.pt"), "does not use a teacher"),
    (dict(method="ard", teacher="t.pt", trades_beta=6.0), "--trades-beta applies to --method trades"),
    (dict(method="trades", ard_temperature=2.0), "--ard-temperature applies to --method ard"),
    (dict(method="ard", teacher="t.pt", ard_alpha=1.5), r"ard_alpha must be in \[0, 1\]"),
    (dict(method="ard", teacher="t.pt", ard_temperature=0.0), "ard_temperature must be > 0"),
    (dict(method="trades", trades_beta=-1.0), "trades_beta must be >= 0"),
])
def test_method_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        make_config(**options)


def test_cli_refuses_rslad_without_teacher(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "rslad", "--out", str(out), "--no-progress"]) == 2
    assert "method 'rslad' needs a teacher (--teacher MODEL)" in capsys.readouterr().err
    assert not out.exists()


def _signed_step_by_hand(student, start, y):
    """The input gradient's sign of the student's cross-entropy at `start`, in eval mode (as every attack runs)."""
    student.eval()
    z = start.clone().requires_grad_()
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(student(z), y, reduction="none").sum(), z)
    student.train()
    return grad.sign()


@pytest.mark.cross_path
@pytest.mark.parametrize("name", ["fgsm-rs", "n-fgsm"])
def test_single_step_baselines_match_their_papers(name):
    """fgsm-rs (Wong et al. 2020): uniform start in the eps-ball, step 1.25·eps, projected onto the ball and [0, 1].
    n-fgsm (de Jorge et al. 2022): noise uniform in [−2·eps, 2·eps], step eps, no projection onto the ball. Both:
    cross-entropy of the student (train mode) on the result; the noise comes from the step seed."""
    student = tiny_cnn(0)
    eps = 0.1
    method = build_method(make_config(method=name, eps=eps), student, None, None, __import__("contextlib").nullcontext)
    x, y = digits_batch(16, seed=3)
    student.train()
    state = {k: v.clone() for k, v in student.state_dict().items()}
    total, terms = method(x, y, 123)
    student.load_state_dict(state)

    noise = (1.0 if name == "fgsm-rs" else 2.0) * eps
    start = (x + torch.empty_like(x).uniform_(-noise, noise, generator=torch.Generator().manual_seed(123))).clamp(0, 1)
    step = (1.25 if name == "fgsm-rs" else 1.0) * eps
    x_adv = start + step * _signed_step_by_hand(student, start, y)
    if name == "fgsm-rs":
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    x_adv = x_adv.clamp(0, 1)
    expected = torch.nn.functional.cross_entropy(student(x_adv), y)
    # The same float32 operations as the attack's (a per-sample loss summed), so the same signs on any CPU.
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-6)
    assert terms["total"] == total.detach() and total.requires_grad
    reach = (x_adv - x).abs().max()
    assert reach <= eps + 1e-6 if name == "fgsm-rs" else reach > eps  # n-fgsm leaves the ball
