"""rkd_fast.attacks: cross-checked against torchattacks and pyautoattack on a small PGD-trained digits model,
plus the contract every attack keeps (shapes, budget, determinism, model state, argument errors)."""

import pytest
import torch
import torch.nn.functional as F

from _digits_model import EPS, one_thread
from rkd_fast import precision
from rkd_fast.attacks import autoattack, cw_linf, fgsm, pgd
from rkd_fast.models import build_model

torchattacks = pytest.importorskip("torchattacks")
pyautoattack = pytest.importorskip("pyautoattack")
pytestmark = pytest.mark.usefixtures("single_thread")

AA_SAMPLES = 100  # AutoAttack is run on the first 100 test samples to keep the time down
# APGD-CE then APGD-T (9 target classes): the gradient half of AutoAttack standard. The full standard version
# (adding FAB-T and Square) takes ~5x longer on 2 CPU cores; test_evaluate runs it once through evaluate().
AA_ATTACKS = ["apgd-ce", "apgd-t"]


def accuracy_points(model, x, y):
    with torch.no_grad():
        return 100.0 * (model(x).argmax(dim=1) == y).float().mean().item()


def test_model_is_meaningfully_robust(robust_model, digits_test):
    # The cross-checks below compare accuracies; on a model whose robust accuracy is 0 they would say nothing.
    x, y = digits_test
    assert accuracy_points(robust_model, x, y) > 90
    assert 40 < accuracy_points(robust_model, pgd(robust_model, x, y, EPS, EPS / 4, 20, seed=0), y) < 95


# --- cross-checks against torchattacks ---------------------------------------------------------------------

def test_pgd_matches_torchattacks_without_random_start(robust_model, digits_test):
    x, y = digits_test
    ours = pgd(robust_model, x, y, EPS, EPS / 4, 20, random_start=False)
    theirs = torchattacks.PGD(robust_model, eps=EPS, alpha=EPS / 4, steps=20, random_start=False)(x, y)
    assert abs(accuracy_points(robust_model, ours, y) - accuracy_points(robust_model, theirs, y)) <= 0.5


def test_pgd_matches_torchattacks_with_random_start(robust_model, digits_test):
    x, y = digits_test
    ours = pgd(robust_model, x, y, EPS, EPS / 4, 20, random_start=True, seed=0)
    torch.manual_seed(0)  # torchattacks draws its start from the global RNG
    theirs = torchattacks.PGD(robust_model, eps=EPS, alpha=EPS / 4, steps=20, random_start=True)(x, y)
    assert abs(accuracy_points(robust_model, ours, y) - accuracy_points(robust_model, theirs, y)) <= 2.0


def test_pgd_l2_matches_torchattacks(robust_model, digits_test):
    x, y = digits_test
    eps = 0.8  # about the L2 size of an L∞ 0.1 perturbation of 64 pixels
    ours = pgd(robust_model, x, y, eps, eps / 4, 10, norm="l2", random_start=False)
    theirs = torchattacks.PGDL2(robust_model, eps=eps, alpha=eps / 4, steps=10, random_start=False)(x, y)
    assert abs(accuracy_points(robust_model, ours, y) - accuracy_points(robust_model, theirs, y)) <= 0.5
    assert (ours - x).flatten(1).norm(dim=1).max() <= eps + 1e-5


def test_fgsm_matches_torchattacks(robust_model, digits_test):
    x, y = digits_test
    ours = fgsm(robust_model, x, y, EPS)
    theirs = torchattacks.FGSM(robust_model, eps=EPS)(x, y)
    assert abs(accuracy_points(robust_model, ours, y) - accuracy_points(robust_model, theirs, y)) <= 0.5


def _reference_cw_linf(model, x, y, eps, alpha, steps):
    """Plain PGD on the CW margin loss, written out independently of rkd_fast.attacks."""
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = (logits - 1e9 * F.one_hot(y, logits.shape[1])).max(dim=1).values
        (grad,) = torch.autograd.grad((other - true).sum(), x_adv)
        x_adv = (x + (x_adv.detach() + alpha * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv


def test_cw_linf_matches_reference(robust_model, digits_test):
    x, y = digits_test
    ours = cw_linf(robust_model, x, y, EPS, EPS / 4, 20, random_start=False)
    reference = _reference_cw_linf(robust_model, x, y, EPS, EPS / 4, 20)
    assert abs(accuracy_points(robust_model, ours, y) - accuracy_points(robust_model, reference, y)) <= 0.5


# --- AutoAttack through pyautoattack -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def autoattack_accuracies(robust_model, digits_test):
    """Robust accuracy (points) on the first AA_SAMPLES test samples: pyautoattack called directly, and
    rkd_fast.attacks.autoattack in fp32 and bf16, and our PGD-20."""
    with one_thread():  # session fixtures are set up before the function-scoped single_thread
        return _autoattack_accuracies(robust_model, digits_test)


def _autoattack_accuracies(model, data):
    x, y = data[0][:AA_SAMPLES], data[1][:AA_SAMPLES]
    direct = pyautoattack.AutoAttack(model, norm="Linf", eps=EPS, version="custom", attacks=AA_ATTACKS, seed=0)
    x_direct, _ = direct.run_standard_evaluation(x, y, batch_size=AA_SAMPLES)
    ours = {precision: autoattack(model, x, y, EPS, version="custom", attacks=AA_ATTACKS, seed=0,
                                  precision=precision) for precision in ("fp32", "bf16")}
    return {
        "direct": accuracy_points(model, x_direct, y),
        "fp32": accuracy_points(model, ours["fp32"], y),
        "bf16": accuracy_points(model, ours["bf16"], y),
        "pgd20": accuracy_points(model, pgd(model, x, y, EPS, EPS / 4, 20, seed=0), y),
    }


@pytest.mark.slow
def test_autoattack_matches_pyautoattack(autoattack_accuracies):
    assert abs(autoattack_accuracies["fp32"] - autoattack_accuracies["direct"]) <= 0.5


@pytest.mark.slow
def test_autoattack_bf16_matches_fp32(autoattack_accuracies):
    assert abs(autoattack_accuracies["bf16"] - autoattack_accuracies["fp32"]) <= 1.0


@pytest.mark.slow
def test_autoattack_at_least_as_strong_as_pgd20(autoattack_accuracies):
    assert autoattack_accuracies["fp32"] <= autoattack_accuracies["pgd20"] + 0.5


def test_autoattack_leaves_global_rng_alone(robust_model, digits_test):
    x, y = digits_test[0][:8], digits_test[1][:8]
    state = torch.get_rng_state()
    autoattack(robust_model, x, y, EPS, version="custom", attacks=["apgd-ce"], seed=3)
    assert torch.equal(torch.get_rng_state(), state)


# --- mixed precision ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("attack", ["pgd", "cw"])
def test_bf16_matches_fp32(robust_model, digits_test, attack):
    x, y = digits_test
    run = pgd if attack == "pgd" else cw_linf
    fp32 = run(robust_model, x, y, EPS, EPS / 4, 20, seed=0)
    bf16 = run(robust_model, x, y, EPS, EPS / 4, 20, seed=0, precision="bf16")
    assert bf16.dtype == torch.float32
    assert abs(accuracy_points(robust_model, bf16, y) - accuracy_points(robust_model, fp32, y)) <= 1.0


def test_precision_the_device_cannot_run_is_a_clear_error(robust_model, digits_test, monkeypatch):
    monkeypatch.setattr(precision, "_autocast_works", lambda device_type, dtype: False)
    x, y = digits_test[0][:4], digits_test[1][:4]
    with pytest.raises(ValueError, match="precision='fp16' is not supported on cpu"):
        pgd(robust_model, x, y, EPS, EPS / 4, 2, precision="fp16")


# --- the contract every attack keeps -----------------------------------------------------------------------

ATTACKS = {
    "fgsm": lambda m, x, y, **kw: fgsm(m, x, y, EPS, **kw),
    "pgd_linf": lambda m, x, y, **kw: pgd(m, x, y, EPS, EPS / 4, 3, seed=0, **kw),
    "pgd_l2": lambda m, x, y, **kw: pgd(m, x, y, 0.8, 0.2, 3, norm="l2", seed=0, **kw),
    "pgd_restarts": lambda m, x, y, **kw: pgd(m, x, y, EPS, EPS / 4, 2, restarts=3, seed=0, **kw),
    "cw_linf": lambda m, x, y, **kw: cw_linf(m, x, y, EPS, EPS / 4, 3, seed=0, **kw),
    "autoattack": lambda m, x, y, **kw: autoattack(m, x, y, EPS, version="custom", attacks=["apgd-ce"], seed=0,
                                                   **kw),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("layout", ["float32", "float64", "channels_last"])
def test_output_shape_dtype_layout_and_budget(robust_model, digits_test, name, layout):
    x, y = digits_test[0][:16], digits_test[1][:16]
    if layout == "float64":
        x = x.double()
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x_adv = ATTACKS[name](robust_model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.stride() == x.stride()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).double()
    if name == "pgd_l2":
        assert delta.flatten(1).norm(dim=1).max() <= 0.8 + 1e-5
    else:
        assert delta.abs().max() <= EPS + 1e-6
    assert delta.abs().max() > 0  # it did move


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_model_mode_and_requires_grad_restored(digits_test, name):
    model = build_model("small_cnn", width=4).train()
    model.block1.eval()  # a mixed state, put back exactly
    model.head[1].weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    ATTACKS[name](model, digits_test[0][:8], digits_test[1][:8])
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())  # no gradient accumulated in the parameters


def test_model_state_restored_when_the_attack_fails():
    model = build_model("small_cnn", width=4).train()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 10])  # 10 is not a class of a 10-way model
    with pytest.raises(ValueError, match="labels must lie in"):
        pgd(model, x, y, EPS, EPS / 4, 2)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_eval_mode_is_used_during_the_attack(digits_test):
    model = build_model("small_cnn", width=4).train()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    pgd(model, digits_test[0][:4], digits_test[1][:4], EPS, EPS / 4, 2, seed=0)
    assert seen and not any(seen)


def test_seeded_attacks_are_reproducible_and_leave_the_global_rng_alone(robust_model, digits_test):
    x, y = digits_test[0][:32], digits_test[1][:32]
    state = torch.get_rng_state()
    first = pgd(robust_model, x, y, EPS, EPS / 4, 3, seed=7)
    again = pgd(robust_model, x, y, EPS, EPS / 4, 3, seed=7)
    other = pgd(robust_model, x, y, EPS, EPS / 4, 3, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_restarts_keep_each_samples_best(robust_model, digits_test):
    # The first restart of a seeded run draws what a one-restart run with that seed draws, and a sample
    # keeps its first success: every sample fooled with one restart is still fooled with three.
    x, y = digits_test
    one = pgd(robust_model, x, y, EPS, EPS / 4, 5, restarts=1, seed=0)
    three = pgd(robust_model, x, y, EPS, EPS / 4, 5, restarts=3, seed=0)
    with torch.no_grad():
        fooled_one = robust_model(one).argmax(1) != y
        fooled_three = robust_model(three).argmax(1) != y
    assert torch.all(fooled_three[fooled_one])
    assert fooled_three.sum() >= fooled_one.sum()


def test_zero_eps_returns_the_inputs(robust_model, digits_test):
    x, y = digits_test[0][:8], digits_test[1][:8]
    assert torch.equal(pgd(robust_model, x, y, 0.0, 0.01, 3, seed=0), x)
    assert torch.equal(fgsm(robust_model, x, y, 0), x)
    assert torch.equal(autoattack(robust_model, x, y, 0.0), x)


def test_empty_batch(robust_model):
    x, y = torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)
    assert pgd(robust_model, x, y, EPS, EPS / 4, 3).shape == x.shape


# --- argument errors ---------------------------------------------------------------------------------------

X, Y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("call, error, match", [
    (lambda m: pgd(m, X, Y, -0.1, 0.01, 3), ValueError, "eps must be >= 0"),
    (lambda m: pgd(m, X, Y, float("nan"), 0.01, 3), ValueError, "eps must be"),
    (lambda m: pgd(m, X, Y, 0.1, 0.0, 3), ValueError, "alpha must be > 0"),
    (lambda m: pgd(m, X, Y, 0.1, 0.01, 0), ValueError, "steps must be >= 1"),
    (lambda m: pgd(m, X, Y, 0.1, 0.01, 2.5), TypeError, "steps must be an int"),
    (lambda m: pgd(m, X, Y, 0.1, 0.01, 3, restarts=0), ValueError, "restarts must be >= 1"),
    (lambda m: pgd(m, X, Y, 0.1, 0.01, 3, norm="Linf"), ValueError, "unknown norm 'Linf'"),
    (lambda m: pgd(m, X, Y, 0.1, 0.01, 3, loss="dlr"), ValueError, "unknown loss 'dlr'"),
    (lambda m: pgd(m, X, Y, 0.1, 0.01, 3, precision="fp8"), ValueError, "unknown precision 'fp8'"),
    (lambda m: pgd(m, X, Y, 0.1, 0.01, 3, restarts=2, random_start=False), ValueError, "random_start"),
    (lambda m: pgd(m, X, Y, 0.1, 0.01, 3, seed=1.5), TypeError, "seed must be an int"),
    (lambda m: pgd(m, X * 2, Y, 0.1, 0.01, 3), ValueError, r"x must lie in \[0, 1\]"),
    (lambda m: pgd(m, X - 0.5, Y, 0.1, 0.01, 3), ValueError, r"x must lie in \[0, 1\]"),
    (lambda m: pgd(m, X, Y[:3], 0.1, 0.01, 3), ValueError, "y must have shape"),
    (lambda m: pgd(m, X, Y[:, None], 0.1, 0.01, 3), ValueError, "y must have shape"),
    (lambda m: pgd(m, X, Y.float(), 0.1, 0.01, 3), TypeError, "y must be an integer tensor"),
    (lambda m: pgd(m, (X * 255).long(), Y, 0.1, 0.01, 3), TypeError, "x must be a floating-point"),
    (lambda m: pgd(m, X.numpy(), Y, 0.1, 0.01, 3), TypeError, "x must be a torch.Tensor"),
    (lambda m: pgd(lambda x: x, X, Y, 0.1, 0.01, 3), TypeError, "model must be a torch.nn.Module"),
    (lambda m: fgsm(m, X, Y, -1.0), ValueError, "eps must be >= 0"),
    (lambda m: cw_linf(m, X, Y, 0.1, 0.01, 3, norm="l2"), TypeError, "cw_linf\\(\\) fixes norm"),
    (lambda m: autoattack(m, X, Y, 0.1, norm="l1"), ValueError, "unknown norm 'l1'"),
    (lambda m: autoattack(m, X, Y, 0.1, version="fast"), ValueError, "unknown version 'fast'"),
    (lambda m: autoattack(m, X, Y, 0.1, version="custom"), ValueError, "needs attacks"),
    (lambda m: autoattack(m, X, Y, 0.1, attacks=["square"]), ValueError, "only used with version='custom'"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_bad_arguments(call, error, match):
    model = build_model("small_cnn", width=4)
    with pytest.raises(error, match=match):
        call(model)

