"""rkd_fast.jacobian_penalty: directions, subsets, outputs, the frozen teacher, BatchNorm statistics, agreement
with the exact Jacobian-vector product, argument errors, and the measured accuracy bounds of the default step."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from _digits_model import one_thread, tiny_cnn

import rkd_fast
from rkd_fast.bench.jacobian_accuracy import penalty_rows, relative_error, train_small_cnn
from rkd_fast.datasets import load_digits
from rkd_fast.jacobian import STEP_PER_PIXEL, default_step, draw_direction, jacobian_penalty

pytestmark = pytest.mark.cross_path  # `make test` runs it again on ATen's portable kernels


def _fd_by_hand(student, teacher, x, d, h):
    """‖(S(x+hd) - S(x))/h - (T(x+hd) - T(x))/h‖² per sample, eval-mode models."""
    diff = (student(x + h * d) - student(x)) / h
    if teacher is not None:
        diff = diff - (teacher(x + h * d) - teacher(x)) / h
    return diff.pow(2).sum(1)


# --- directions ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["rademacher", "gaussian"])
def test_l2_directions_have_unit_norm_per_sample(direction):
    x = torch.rand(5, 3, 4, 4)
    d = draw_direction(x, direction, "l2")
    assert d.shape == x.shape and d.dtype == x.dtype
    torch.testing.assert_close(d.flatten(1).norm(dim=1), torch.ones(5))
    if direction == "rademacher":  # ±1/sqrt(D) entries
        torch.testing.assert_close(d.abs(), torch.full_like(d, 1 / math.sqrt(48)))


@pytest.mark.parametrize("direction", ["rademacher", "gaussian"])
def test_linf_directions_are_signs(direction):
    d = draw_direction(torch.rand(5, 3, 4, 4), direction, "linf")
    assert set(d.unique().tolist()) == {-1.0, 1.0}


def test_grad_direction_is_the_normalised_teacher_input_gradient(tiny_batch):
    x, y = tiny_batch
    student, teacher = tiny_cnn(seed=1).eval(), tiny_cnn(seed=2).eval()
    x_req = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(F.cross_entropy(teacher(x_req), y, reduction="sum"), x_req)
    d = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    h = 1e-2
    got = jacobian_penalty(student, x, y, teacher=teacher, h=h, direction="grad", reduction="none")
    with torch.no_grad():
        want = _fd_by_hand(student, teacher, x, d, h)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # linf: the sign of the same gradient
    got = jacobian_penalty(student, x, y, teacher=teacher, h=h, direction="grad", norm="linf", reduction="none")
    with torch.no_grad():
        want = _fd_by_hand(student, teacher, x, g.sign(), h)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_grad_direction_without_teacher_uses_the_student(tiny_batch):
    x, y = tiny_batch
    student = tiny_cnn(seed=1).eval()
    x_req = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(F.cross_entropy(student(x_req), y, reduction="sum"), x_req)
    d = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    got = jacobian_penalty(student, x, y, h=1e-2, direction="grad", reduction="none")
    with torch.no_grad():
        want = _fd_by_hand(student, None, x, d, 1e-2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_rademacher_penalty_matches_the_hand_computation(tiny_batch):
    x, _ = tiny_batch
    student, teacher = tiny_cnn(seed=1).eval(), tiny_cnn(seed=2).eval()
    torch.manual_seed(5)
    got = jacobian_penalty(student, x, teacher=teacher, h=1e-2, reduction="none")
    torch.manual_seed(5)
    d = draw_direction(x, "rademacher", "l2")
    with torch.no_grad():
        want = _fd_by_hand(student, teacher, x, d, 1e-2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_default_step_scales_with_input_and_norm():
    x = torch.rand(4, 3, 8, 8)
    h_l2, h_inf = default_step(x, "l2", torch.float32), default_step(x, "linf", torch.float32)
    rms = x.square().mean().sqrt()
    torch.testing.assert_close(h_inf, STEP_PER_PIXEL[torch.float32] * rms)
    torch.testing.assert_close(h_l2, h_inf * math.sqrt(3 * 64))
    torch.testing.assert_close(default_step(10 * x, "l2", torch.float32), 10 * h_l2)
    assert default_step(x, "l2", torch.float16) > h_l2  # a coarser dtype takes a larger step
    with pytest.raises(ValueError, match="bfloat16"):
        default_step(x, "l2", torch.bfloat16)


# --- fraction and outputs -----------------------------------------------------------------------------------

def test_fraction_selects_a_subset_and_scales_the_reductions():
    x = torch.rand(8, 1, 8, 8)
    student, teacher = tiny_cnn(seed=1).eval(), tiny_cnn(seed=2).eval()
    results = {}
    for reduction in ("none", "mean", "sum"):
        torch.manual_seed(3)
        results[reduction] = jacobian_penalty(student, x, teacher=teacher, h=1e-2, fraction=0.25,
                                              reduction=reduction)
    rows = results["none"]
    assert rows.shape == (8,)
    assert int((rows != 0).sum()) == 2  # k = round(0.25 * 8)
    torch.testing.assert_close(rows.mean(), results["mean"])
    torch.testing.assert_close(rows.sum(), results["sum"])
    # The selected rows are the full-batch values of those samples times N/k (eval mode: per-sample outputs).
    torch.manual_seed(3)
    idx = torch.randperm(8)[:2]
    d = draw_direction(x[idx], "rademacher", "l2")
    with torch.no_grad():
        want = _fd_by_hand(student, teacher, x[idx], d, 1e-2)
    torch.testing.assert_close(rows[idx], want * 4, rtol=1e-4, atol=1e-6)


def test_fraction_rounds_to_at_least_one_sample():
    x = torch.rand(3, 1, 8, 8)
    rows = jacobian_penalty(tiny_cnn(0).eval(), x, h=1e-2, fraction=0.01, reduction="none")
    assert int((rows != 0).sum()) == 1


@pytest.mark.parametrize("estimator", ["fd", "exact"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_return_outputs_cover_the_whole_batch(tiny_batch, estimator, fraction):
    x, y = tiny_batch
    student, teacher = tiny_cnn(seed=1).eval(), tiny_cnn(seed=2).eval()
    loss, s, t = jacobian_penalty(student, x, y, teacher=teacher, estimator=estimator, fraction=fraction,
                                  return_outputs=True)
    assert loss.dim() == 0 and s.shape == t.shape == (6, 10)
    with torch.no_grad():
        torch.testing.assert_close(s, student(x))
        torch.testing.assert_close(t, teacher(x))
    assert s.requires_grad and not t.requires_grad
    # the caller's CE and KD terms reuse them
    total = loss + F.cross_entropy(s, y) + F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")
    total.backward()
    assert all(p.grad is not None for p in student.parameters())
    loss, s, t = jacobian_penalty(student, x, estimator=estimator, return_outputs=True)
    assert t is None and s.shape == (6, 10)


# --- teacher ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ["fd", "exact"])
@pytest.mark.parametrize("direction", ["rademacher", "grad"])
def test_teacher_gets_no_gradients(tiny_batch, estimator, direction):
    x, y = tiny_batch
    student, teacher = tiny_cnn(seed=1), tiny_cnn(seed=2).eval()
    state = copy.deepcopy(teacher.state_dict())
    assert all(p.requires_grad for p in teacher.parameters())
    loss = jacobian_penalty(student, x, y, teacher=teacher, estimator=estimator, direction=direction)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    # every student weight gets a gradient (the last layer's bias does not reach J·d)
    weights = [p for name, p in student.named_parameters() if name.endswith("weight")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, state[name])


# --- BatchNorm ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ["fd", "exact"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_running_stats_are_those_of_a_clean_forward(tiny_batch, estimator, fraction):
    x, y = tiny_batch
    student, teacher = tiny_cnn(seed=1).train(), tiny_cnn(seed=2).train()
    clean_s, clean_t = copy.deepcopy(student), copy.deepcopy(teacher)
    clean_s(x)
    with torch.no_grad():
        clean_t(x)
    loss = jacobian_penalty(student, x, y, teacher=teacher, estimator=estimator, fraction=fraction)
    loss.backward()
    for model, clean in ((student, clean_s), (teacher, clean_t)):
        for (name, value), (_, want) in zip(model.named_buffers(), clean.named_buffers()):
            torch.testing.assert_close(value, want, msg=lambda m: f"buffer {name}: {m}")
        assert all("forward" not in m.__dict__ for m in model.modules())  # the replay patch is undone


def test_perturbed_pass_uses_the_clean_batch_statistics():
    # With a subset in train mode the FD term must still estimate J·d (not the change of the batch statistics
    # divided by h): compare with the exact term on the same subset and directions, in float64.
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64)
    student = tiny_cnn(seed=1).double().train()
    torch.manual_seed(4)
    fd = jacobian_penalty(student, x, h=1e-6, fraction=0.5, reduction="none")
    torch.manual_seed(4)
    exact = jacobian_penalty(student, x, estimator="exact", fraction=0.5, reduction="none")
    assert int((exact != 0).sum()) == 4
    torch.testing.assert_close(fd, exact, rtol=1e-4, atol=1e-10)


# --- fd against exact ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("on", ["logits", "probs"])
def test_exact_matches_torch_func_jvp_float64(tiny_batch, on):
    x, _ = tiny_batch
    x = x.double()
    student, teacher = tiny_cnn(seed=1).double().eval(), tiny_cnn(seed=2).double().eval()
    torch.manual_seed(7)
    got = jacobian_penalty(student, x, teacher=teacher, estimator="exact", on=on, temperature=2.0, reduction="none")
    torch.manual_seed(7)
    d = draw_direction(x, "rademacher", "l2")
    g = (lambda m: lambda z: m(z)) if on == "logits" else (lambda m: lambda z: torch.softmax(m(z) / 2.0, dim=1))
    _, jd_s = torch.func.jvp(g(student), (x,), (d,))
    _, jd_t = torch.func.jvp(g(teacher), (x,), (d,))
    torch.testing.assert_close(got, (jd_s - jd_t).pow(2).sum(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("on", ["logits", "probs"])
@pytest.mark.parametrize("train", [False, True])
def test_fd_matches_exact_float64_with_gradients(on, train):
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    teacher = tiny_cnn(seed=2).double().eval()
    grads, values = {}, {}
    for estimator, h in (("fd", 1e-6), ("exact", None)):
        student = tiny_cnn(seed=1).double().train(train)
        torch.manual_seed(9)
        loss = jacobian_penalty(student, x, teacher=teacher, h=h, estimator=estimator, on=on, temperature=2.0)
        loss.backward()
        values[estimator] = loss.detach()
        # a parameter that does not reach J·d (the last bias) has no gradient under "exact", 0 under "fd"
        grads[estimator] = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                                   for p in student.parameters()])
    torch.testing.assert_close(values["fd"], values["exact"], rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(grads["fd"], grads["exact"], rtol=1e-3, atol=1e-6 * grads["exact"].abs().max())


def test_fd_matches_exact_float32(tiny_batch):
    x, _ = tiny_batch
    student = tiny_cnn(seed=1).eval()
    fd, exact = (penalty_rows(student, x, torch.float32, estimator=m) for m in ("fd", "exact"))
    assert relative_error(fd, exact)[0] < 0.02


def test_exact_runs_without_grad_mode(tiny_batch):
    x, _ = tiny_batch
    student = tiny_cnn(seed=1).eval()
    with torch.no_grad():
        loss = jacobian_penalty(student, x, estimator="exact")
    assert loss > 0 and not loss.requires_grad


# --- precision ----------------------------------------------------------------------------------------------

def test_bfloat16_autocast_default_runs_the_passes_in_float32(tiny_batch):
    x, _ = tiny_batch
    student = tiny_cnn(seed=1).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, s_default, _ = jacobian_penalty(student, x, return_outputs=True)
        _, s_explicit, _ = jacobian_penalty(student, x, h=0.1, return_outputs=True)
    assert s_default.dtype == torch.float32 and s_explicit.dtype == torch.bfloat16


def test_float16_autocast_keeps_float16(tiny_batch):
    x, _ = tiny_batch
    with torch.autocast("cpu", dtype=torch.float16):
        _, s, _ = jacobian_penalty(tiny_cnn(seed=1).eval(), x, return_outputs=True)
    assert s.dtype == torch.float16


# --- errors -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    ({"direction": "uniform"}, ValueError, "direction"),
    ({"norm": "l1"}, ValueError, "norm"),
    ({"estimator": "jvp"}, ValueError, "estimator"),
    ({"on": "features"}, ValueError, "on"),
    ({"reduction": "max"}, ValueError, "reduction"),
    ({"fraction": 0.0}, ValueError, "fraction"),
    ({"fraction": 1.5}, ValueError, "fraction"),
    ({"fraction": -0.5}, ValueError, "fraction"),
    ({"h": 0.0}, ValueError, "h must"),
    ({"h": -1e-3}, ValueError, "h must"),
    ({"h": float("nan")}, ValueError, "h must"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"direction": "grad"}, ValueError, "needs the labels y"),
])
def test_bad_arguments(tiny_batch, kwargs, error, match):
    x, _ = tiny_batch
    with pytest.raises(error, match=match):
        jacobian_penalty(tiny_cnn(0), x, **kwargs)


def test_bad_inputs(tiny_batch):
    x, y = tiny_batch
    student = tiny_cnn(0)
    with pytest.raises(TypeError, match="floating-point"):
        jacobian_penalty(student, (x * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        jacobian_penalty(student, x.tolist())
    with pytest.raises(ValueError, match="y must be"):
        jacobian_penalty(student, x, y[:3], direction="grad")
    with pytest.raises(ValueError, match="class counts differ"):
        jacobian_penalty(student, x, teacher=tiny_cnn(0, num_classes=7))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        jacobian_penalty(nn.Flatten(0), x)


# --- measured accuracy of the default step (docs/jacobian_accuracy.md) --------------------------------------

@pytest.fixture(scope="module")
def trained_cnn():
    # The digits CNN after 200 seeded SGD steps (a few seconds); 128 test images.
    with one_thread():
        model = train_small_cnn(steps=200, seed=0)
    x, _ = load_digits("test")
    return model, x[:128]


def test_float32_default_step_within_5_percent_of_exact(trained_cnn):
    model, x = trained_cnn
    fd = penalty_rows(model, x, torch.float32)
    exact = penalty_rows(model, x, torch.float32, estimator="exact")
    assert relative_error(fd, exact)[0] <= 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_default_step_within_10_percent_of_float32_fd(trained_cnn, dtype):
    model, x = trained_cnn
    low = penalty_rows(model, x, dtype)
    step_dtype = dtype if dtype in STEP_PER_PIXEL else torch.float32  # bfloat16 falls back to float32
    h = default_step(x, "l2", step_dtype).item()
    ref = penalty_rows(model, x, torch.float32, h=h)
    assert relative_error(low, ref)[0] <= 0.10
    # and the term stays close to the exact value (within the same 10%)
    exact = penalty_rows(model, x, torch.float32, estimator="exact")
    assert relative_error(low, exact)[0] <= 0.10


def test_exported():
    assert rkd_fast.jacobian_penalty is jacobian_penalty


@pytest.mark.parametrize("compile_in_place", [False, True])
def test_compiled_student_with_train_mode_batchnorm_is_refused(compile_in_place):
    # Dynamo does not guard on forward hooks, so a compiled graph could skip the statistics recording silently.
    student = tiny_cnn().train()
    if compile_in_place:
        student.compile()
    else:
        student = torch.compile(student)
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(NotImplementedError, match="BatchNorm in train mode"):
        jacobian_penalty(student, x, h=0.1)


# --- dropout: the perturbed pass multiplies by the clean pass's mask ----------------------------------------------

class _LinearDropout(nn.Module):
    """logits = Dropout(W·flatten(x) + b): linear, so J·d = mask ⊙ (W·d) exactly, and the mask can be read back
    from the clean logits (mask = logits / (W·x + b))."""

    def __init__(self, p=0.5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(64, 10, dtype=torch.float64)
        self.dropout = nn.Dropout(p)

    def forward(self, x):
        return self.dropout(self.linear(x.flatten(1)))


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("estimator", ["fd", "exact"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_dropout_perturbed_pass_reuses_the_clean_mask(batched, estimator, fraction):
    """The issue's case: a Linear + Dropout(0.5) student in train mode measured mask noise / h (1e6 against 0.05 in
    eval mode). Now the term equals the same computation with the clean pass's mask fixed by hand."""
    if batched and estimator == "exact":
        pytest.skip("the exact estimator always makes its own passes")
    student = _LinearDropout().train()
    if batched:
        rkd_fast.clean_pass.share_clean_statistics(student)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10, dtype=torch.float64)).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 8, 8, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=generator)
    h = 1e-4
    rows, s_clean, _ = jacobian_penalty(student, x, y, teacher=teacher, h=h, direction="grad", estimator=estimator,
                                        fraction=fraction, reduction="none", return_outputs=True)
    with torch.no_grad():
        mask = s_clean / student.linear(x.flatten(1))
    assert set(mask.unique().tolist()) <= {0.0, 2.0}  # Bernoulli(0.5) / 0.5: the clean pass was masked
    xt = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(teacher(xt), y, reduction="sum"), xt)
    d = grad.flatten(1) / grad.flatten(1).norm(dim=1, keepdim=True)
    by_hand = (mask * (d @ student.linear.weight.T) - d @ teacher[1].weight.T).square().sum(1)
    selected = rows.nonzero().squeeze(1)  # fraction < 1: the subset's rows, scaled by N/k
    assert len(selected) == round(fraction * 8)
    torch.testing.assert_close(rows[selected] * fraction, by_hand[selected].detach(), rtol=1e-5, atol=1e-10)


def test_dropout_penalty_is_that_of_a_fixed_mask_model_not_mask_noise():
    """mobilenet-like classifier head dropout: train mode with the shared mask stays at the eval-mode scale."""
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))
    x = torch.rand(64, 1, 8, 8)
    train_value = float(jacobian_penalty(student.train(), x, h=0.05).detach())
    eval_value = float(jacobian_penalty(student.eval(), x, h=0.05).detach())
    # With a mask kept, train mode is the Jacobian of a random half of the units, scaled by 2: about twice the
    # eval value (E‖M⊙v‖² = 2‖v‖² for Bernoulli(1/2)/(1/2)); a new mask per pass gave ~1e6 times more.
    assert 0.5 * eval_value < train_value < 8 * eval_value


def test_alpha_dropout_in_train_mode_is_refused():
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.AlphaDropout(0.2)).train()
    with pytest.raises(NotImplementedError, match="AlphaDropout"):
        jacobian_penalty(student, torch.rand(4, 1, 8, 8), h=0.1)
