"""RobustKDLoss: each term against a plain PyTorch computation, hooks, adapters, weights, frozen teacher."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _digits_model import digits_batch, tiny_cnn

from rkd_fast import RobustKDLoss, jacobian_penalty
from rkd_fast.losses import FeatureAdapter, kd_loss
from rkd_fast.ops import _reference


def _models(student_width=4, teacher_width=8, num_classes=10):
    return tiny_cnn(width=student_width), tiny_cnn(width=teacher_width, num_classes=num_classes)


def _features(model, x, names):
    """Outputs of the named modules in a plain forward (hooks removed right after)."""
    modules = dict(model.named_modules())
    out = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o)) for n in names]
    logits = model(x)
    for h in handles:
        h.remove()
    return logits, [out[n] for n in names]


@pytest.mark.cross_path
def test_terms_match_plain_pytorch():
    student, teacher = _models()
    student.eval()  # eval mode: a second forward of the reference sees the same function
    x, y = digits_batch(12)
    pairs = [("block2", "block3"), ("block3", "block3")]
    weights = dict(ce_weight=0.7, kd_weight=1.3, kd_temperature=3.0, feat_weight=0.4, jac_weight=2.0)
    jac_options = {"direction": "rademacher", "h": 1e-2, "on": "probs", "temperature": 2.0}
    loss_fn = RobustKDLoss(student, teacher, feature_pairs=pairs, example_input=x, label_smoothing=0.1,
                           jacobian=jac_options, **weights)
    torch.manual_seed(5)
    total, terms = loss_fn(x, y)

    s_logits, s_feats = _features(student, x, ["block2", "block3"])
    with torch.no_grad():
        t_logits, t_feats = _features(teacher, x, ["block3", "block3"])
    ce = F.cross_entropy(s_logits, y, label_smoothing=0.1)
    T = 3.0
    p_t = F.softmax(t_logits / T, dim=1)
    kd = (p_t * (p_t.log() - F.log_softmax(s_logits / T, dim=1))).sum(1).mean() * T * T
    feat = torch.stack([_reference.feature_distance(adapter(s), t, mode="normalized")
                        for adapter, s, t in zip(loss_fn.adapters, s_feats, t_feats)]).mean()
    torch.manual_seed(5)
    jac = jacobian_penalty(student, x, y, teacher=teacher, **jac_options)
    expected = {"ce": ce, "kd": kd, "feat": feat, "jac": jac}
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)
    weighted = sum(weights[f"{name}_weight"] * value for name, value in expected.items())
    torch.testing.assert_close(total, weighted, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["total"], total.detach())

    # Gradients reach the student and the adapters, never the teacher.
    total.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None for p in loss_fn.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_terms_are_detached_0d_tensors():
    student, teacher = _models()
    x, y = digits_batch(12)
    total, terms = RobustKDLoss(student, teacher, feature_pairs=[("block3", "block3")], example_input=x)(x, y)
    assert set(terms) == {"ce", "kd", "feat", "jac", "total"}
    for value in terms.values():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
    assert total.requires_grad and total.dtype == torch.float32


def test_hooks_record_the_clean_pass_only():
    # Train mode: the Jacobian term's perturbed forward must not replace the clean features. A copy made before
    # the step gives the clean forward's features (same weights, same batch statistics).
    student, teacher = _models()
    x, y = digits_batch(12)
    loss_fn = RobustKDLoss(student, teacher, feature_pairs=[("block2", "block2")], example_input=x,
                           ce_weight=0, kd_weight=0, jac_weight=1.0, jacobian={"h": 0.5})
    reference_student = copy.deepcopy(student)
    for hook_owner in reference_student.modules():
        hook_owner._forward_hooks.clear()
    _, terms = loss_fn(x, y)
    _, (s_feat,) = _features(reference_student, x, ["block2"])
    with torch.no_grad():
        _, (t_feat,) = _features(teacher, x, ["block2"])
    expected = _reference.feature_distance(loss_fn.adapters[0](s_feat), t_feat, mode="normalized")
    torch.testing.assert_close(terms["feat"], expected.detach(), rtol=1e-5, atol=1e-6)


def _count_clean_calls(model, x):
    calls = {"clean": 0, "all": 0}

    def count(module, inputs):
        calls["all"] += 1
        calls["clean"] += int(inputs[0].shape == x.shape and torch.equal(inputs[0], x))
    return calls, model.register_forward_pre_hook(count)


@pytest.mark.parametrize("jac_weight", [0.0, 1.0])
def test_one_clean_forward_per_model(jac_weight):
    student, teacher = _models()
    x, y = digits_batch(12)
    loss_fn = RobustKDLoss(student, teacher, feature_pairs=[("block3", "block3")], example_input=x,
                           jac_weight=jac_weight)
    s_calls, s_handle = _count_clean_calls(student, x)
    t_calls, t_handle = _count_clean_calls(teacher, x)
    loss_fn(x, y)
    s_handle.remove(), t_handle.remove()
    assert s_calls["clean"] == 1 and t_calls["clean"] == 1
    # With the Jacobian term each model runs once more, on the perturbed input.
    assert s_calls["all"] == t_calls["all"] == (2 if jac_weight else 1)


def test_zero_weights_skip_terms_and_teacher():
    student, teacher = _models()
    x, y = digits_batch(12)
    loss_fn = RobustKDLoss(student, teacher, feature_pairs=[("block3", "block3")], example_input=x,
                           kd_weight=0, feat_weight=0, jac_weight=0)
    assert not loss_fn.feature_pairs and len(loss_fn.adapters) == 0  # no hooks, no adapters for a skipped term
    t_calls, handle = _count_clean_calls(teacher, x)
    total, terms = loss_fn(x, y)
    handle.remove()
    assert t_calls["all"] == 0
    assert set(terms) == {"ce", "total"}
    torch.testing.assert_close(total, F.cross_entropy(student(x), y))


def test_parameters_state_dict_and_mode_hold_adapters_only():
    student, teacher = _models()
    x, _ = digits_batch(12)
    loss_fn = RobustKDLoss(student, teacher, feature_pairs=[("block2", "block3")], example_input=x)
    names = [name for name, _ in loss_fn.named_parameters()]
    assert names == ["adapters.0.proj.weight"]
    assert list(loss_fn.state_dict()) == names
    assert loss_fn.student is student and loss_fn.teacher is teacher
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    student.train()
    loss_fn.eval()
    assert student.training  # the loss's mode is its own
    loss_fn.train()
    assert not teacher.training
    # An optimizer built right after construction sees the adapter, which then learns.
    optimizer = torch.optim.SGD(list(student.parameters()) + list(loss_fn.parameters()), lr=0.1)
    before = loss_fn.adapters[0].proj.weight.detach().clone()
    x, y = digits_batch(12)
    loss_fn(x, y)[0].backward()
    optimizer.step()
    assert not torch.equal(before, loss_fn.adapters[0].proj.weight)


def test_teacher_runs_in_eval_mode_even_if_switched():
    student, teacher = _models()
    x, y = digits_batch(12)
    loss_fn = RobustKDLoss(student, teacher, feat_weight=0, jac_weight=0)
    teacher.train()
    stats = teacher.block1[1].running_mean.clone()
    loss_fn(x, y)
    assert not teacher.training
    assert torch.equal(stats, teacher.block1[1].running_mean)


def test_construction_leaves_batchnorm_statistics_alone():
    student, teacher = _models()
    student.train()
    stats = student.block1[1].running_mean.clone()
    RobustKDLoss(student, teacher, feature_pairs=[("block3", "block3")], example_input=digits_batch(12)[0])
    assert student.training and torch.equal(stats, student.block1[1].running_mean)


@pytest.mark.parametrize("s_shape,t_shape,mode,kind", [
    ((2, 4, 8, 8), (2, 16, 4, 4), "normalized", "conv+pool"),
    ((2, 4, 2, 2), (2, 16, 4, 4), "mse", "conv+interpolate"),
    ((2, 4, 4, 4), (2, 16, 4, 4), "attention", "identity"),
    ((2, 4, 8, 8), (2, 16, 4, 4), "attention", "pool"),
    ((2, 6), (2, 9), "normalized", "linear"),
])
def test_adapter_shapes(s_shape, t_shape, mode, kind):
    adapter = FeatureAdapter(s_shape, t_shape, map_channels=mode != "attention")
    out = adapter(torch.randn(s_shape))
    expected = t_shape if mode != "attention" else s_shape[:2] + t_shape[2:]
    assert tuple(out.shape) == expected
    assert isinstance(adapter.proj, torch.nn.Conv2d) == kind.startswith("conv")
    assert isinstance(adapter.proj, torch.nn.Linear) == (kind == "linear")
    assert adapter.resize == ("pool" in kind or "interpolate" in kind)


def test_attention_mode_needs_no_channel_adapter():
    student, teacher = _models()
    x, y = digits_batch(12)
    loss_fn = RobustKDLoss(student, teacher, feature_pairs=[("block3", "block3")], example_input=x,
                           feature_mode="attention", jac_weight=0)
    assert isinstance(loss_fn.adapters[0], torch.nn.Identity)
    _, terms = loss_fn(x, y)
    assert torch.isfinite(terms["feat"])


def test_kd_loss_is_zero_for_equal_logits_and_scales_with_t_squared():
    logits = torch.randn(5, 10)
    assert kd_loss(logits, logits, 4.0).abs() < 1e-6
    other = torch.randn(5, 10)
    p_t = F.softmax(other, dim=1)
    plain = (p_t * (p_t.log() - F.log_softmax(logits, dim=1))).sum(1).mean()
    torch.testing.assert_close(kd_loss(logits, other, 1.0), plain)
    kept = torch.tensor([True, False, True, False, False])  # the others count 0 in the batch mean
    per_sample = (p_t * (p_t.log() - F.log_softmax(logits, dim=1))).sum(1)
    torch.testing.assert_close(kd_loss(logits, other, 1.0, kept), per_sample[kept].sum() / 5)


def test_unknown_layer_names_list_the_available_ones():
    student, teacher = _models()
    x, _ = digits_batch(12)
    with pytest.raises(ValueError, match=r"student has no module named 'blok3'; available: .*'block3'"):
        RobustKDLoss(student, teacher, feature_pairs=[("blok3", "block3")], example_input=x)
    with pytest.raises(ValueError, match=r"teacher has no module named 'fc'; available: .*'head'"):
        RobustKDLoss(student, teacher, feature_pairs=[("block3", "fc")], example_input=x)


def test_class_count_mismatch():
    student, teacher = _models(num_classes=5)
    x, y = digits_batch(12)
    with pytest.raises(ValueError, match="number of classes"):
        RobustKDLoss(student, teacher, feature_pairs=[("block3", "block3")], example_input=x)
    loss_fn = RobustKDLoss(student, teacher, feat_weight=0, jac_weight=0)  # no example input: caught at the call
    with pytest.raises(ValueError, match="class counts"):
        loss_fn(x, y)


@pytest.mark.parametrize("kwargs,match", [
    ({"kd_weight": -1.0}, "kd_weight"),
    ({"jac_weight": float("nan")}, "jac_weight"),
    ({"kd_temperature": 0.0}, "kd_temperature"),
    ({"feature_mode": "cosine"}, "feature_mode"),
    ({"jacobian": {"steps": 3}}, "unknown jacobian option"),
    ({"feature_pairs": [("block3",)]}, "feature_pairs"),
    ({"feature_pairs": []}, "feat_weight > 0 needs feature_pairs"),
    ({"feature_pairs": [("block3", "block3")], "example_input": None}, "example_input"),
])
def test_bad_arguments(kwargs, match):
    student, teacher = _models()
    base = {"feature_pairs": [("block3", "block3")], "example_input": digits_batch(12)[0]}
    with pytest.raises(ValueError, match=match):
        RobustKDLoss(student, teacher, **{**base, **kwargs})
    with pytest.raises(TypeError, match="teacher must be"):
        RobustKDLoss(student, lambda x: x)


# --- the adapter's resize: the functions of F.adaptive_avg_pool2d and F.interpolate, by matrix products --------

@pytest.mark.cross_path
@pytest.mark.parametrize("src, dst", [((8, 8), (4, 4)), ((7, 5), (3, 2)), ((6, 6), (6, 3)), ((5, 5), (1, 1)),
                                      ((2, 2), (4, 4)), ((3, 5), (7, 6)), ((1, 1), (3, 3)), ((4, 2), (5, 5))],
                         ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_adapter_resize_matches_torch(src, dst, layout):
    from rkd_fast.losses import FeatureAdapter

    adapter = FeatureAdapter((2, 3) + src, (2, 3) + dst).double()
    x = torch.randn(2, 3, *src, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    pool = all(s >= t for s, t in zip(src, dst))
    expected = F.adaptive_avg_pool2d(x, dst) if pool else F.interpolate(x, size=dst, mode="bilinear",
                                                                        align_corners=False)
    got = adapter(x)
    if src != (1, 1):  # a 1×1 map is both contiguous and channels_last
        assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                                 torch.contiguous_format)  # the input's layout
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    weight = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(got, x, weight)[0], torch.autograd.grad(expected, x, weight)[0],
                               rtol=1e-6, atol=1e-7)


@pytest.mark.cross_path
def test_adapter_resize_keeps_low_precision_inputs_accurate():
    from rkd_fast.losses import FeatureAdapter

    adapter = FeatureAdapter((2, 4, 6, 6), (2, 4, 2, 2))
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = adapter(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.adaptive_avg_pool2d(x.bfloat16().float(), 2), rtol=1e-2, atol=1e-2)
    assert "resize_h" not in adapter.state_dict()  # a function of the shapes, not a parameter


# --- the terms at the student's adversarial point (eps given: the trainer's default) ------------------------------

@pytest.mark.cross_path
@pytest.mark.parametrize("jac_weight, teacher_at, kd_samples", [
    (0.0, "student", "all"), (0.5, "student", "all"), (0.0, "clean", "all"), (0.5, "clean", "all"),
    (0.0, "student", "teacher-correct")])
@pytest.mark.parametrize("train", [False, True])
def test_adversarial_point_terms_match_a_direct_computation(jac_weight, teacher_at, kd_samples, train):
    """With eps: x̃ = clamp(x + U(−2·eps, 2·eps)), x' = clamp(x̃ + h·sign(∇x̃ CE(S_eval(x̃), y))) with h = eps; CE, KD and
    features at x' (the teacher's at x with teacher_at "clean"; KD only where the teacher is right with kd_samples
    "teacher-correct"); the Jacobian term (S(x') − S(x̃))/h against the teacher's, S(x') normalised with the
    statistics of the S(x̃) batch (train mode). Written out here from the seed."""
    student, teacher = _models()
    student.train(train)
    x, y = digits_batch(12)
    eps, h = 0.1, 0.1
    pairs = [("block2", "block3")]
    loss_fn = RobustKDLoss(student, teacher, feature_pairs=pairs, example_input=x, eps=eps, ce_weight=0.7,
                           kd_weight=1.3, kd_temperature=1.0, feat_weight=0.4, jac_weight=jac_weight,
                           teacher_at=teacher_at, kd_samples=kd_samples)
    state = copy.deepcopy(student.state_dict())
    total, terms = loss_fn(x, y, seed=11)
    student.load_state_dict(state)  # undo the running-statistics update

    noise = torch.empty_like(x).uniform_(-2 * eps, 2 * eps, generator=torch.Generator().manual_seed(11))
    start = (x + noise).clamp(0, 1)
    student.eval()
    z = start.clone().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(student(z), y, reduction="none").sum(), z)
    student.train(train)
    x_adv = (start + h * grad.sign()).clamp(0, 1)
    if jac_weight and train:  # x' normalised with the batch statistics of the x̃ pass, by hand
        moments = {}
        bns = [m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        hooks = [m.register_forward_pre_hook(lambda m, a: moments.__setitem__(m, (a[0].mean((0, 2, 3)),
                                                                                a[0].var((0, 2, 3), unbiased=False))))
                 for m in bns]
        s_start = student(start)
        for hook in hooks:
            hook.remove()
        student.eval()
        saved = {m: (m.running_mean.clone(), m.running_var.clone()) for m in bns}
        with torch.no_grad():
            for m in bns:
                m.running_mean.copy_(moments[m][0])
                m.running_var.copy_(moments[m][1])
        s_adv, s_feats = _features(student, x_adv, ["block2"])
        with torch.no_grad():
            for m in bns:
                m.running_mean.copy_(saved[m][0])
                m.running_var.copy_(saved[m][1])
        student.train()
    else:
        s_start = student(start) if jac_weight else None
        s_adv, s_feats = _features(student, x_adv, ["block2"])
    with torch.no_grad():
        t_target, t_feats = _features(teacher, x if teacher_at == "clean" else x_adv, ["block3"])
        t_adv, t_start = teacher(x_adv), teacher(start)
    kept = None
    if kd_samples == "teacher-correct":
        kept = t_target.argmax(1) == y
        assert 0 < kept.sum() < len(y)  # the mask matters in this batch
    expected = {"ce": F.cross_entropy(s_adv, y), "kd": kd_loss(s_adv, t_target, 1.0, kept),
                "feat": _reference.feature_distance(loss_fn.adapters[0](s_feats[0]), t_feats[0], mode="normalized")}
    if jac_weight:
        expected["jac"] = (((s_adv - s_start) - (t_adv - t_start)) / h).square().sum(1).mean()
    assert set(terms) == set(expected) | {"total"}
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value.detach(), rtol=1e-4, atol=1e-5, msg=name)
    weights = {"ce": 0.7, "kd": 1.3, "feat": 0.4, "jac": jac_weight}
    torch.testing.assert_close(total, sum(weights[k] * v for k, v in expected.items()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("teacher_at", ["student", "clean"])
def test_a_pgd_point_replaces_the_n_fgsm_one(teacher_at):
    """steps=2: the terms at pgd's point (a uniform start in the eps-ball, two projected steps of alpha, the same
    seed), not at N-FGSM's; the teacher's targets there, or at x with teacher_at "clean"."""
    from rkd_fast.attacks import n_fgsm, pgd

    student, teacher = _models()
    student.eval()  # no running-statistics update between the loss's attack and the one written out here
    x, y = digits_batch(12)
    eps, alpha = 0.1, 0.03
    loss_fn = RobustKDLoss(student, teacher, feature_pairs=[("block2", "block3")], example_input=x, eps=eps,
                           steps=2, alpha=alpha, ce_weight=0.7, kd_weight=1.3, kd_temperature=1.0, feat_weight=0.4,
                           jac_weight=0, teacher_at=teacher_at)
    total, terms = loss_fn(x, y, seed=11)
    x_adv = pgd(student, x, y, eps, alpha, 2, norm="linf", random_start=True, seed=11)
    assert (x_adv - x).abs().max() <= eps + 1e-6 < (n_fgsm(student, x, y, eps, seed=11) - x).abs().max()
    s_adv, s_feats = _features(student, x_adv, ["block2"])
    with torch.no_grad():
        t_target, t_feats = _features(teacher, x if teacher_at == "clean" else x_adv, ["block3"])
    expected = {"ce": F.cross_entropy(s_adv, y), "kd": kd_loss(s_adv, t_target, 1.0),
                "feat": _reference.feature_distance(loss_fn.adapters[0](s_feats[0]), t_feats[0], mode="normalized")}
    assert set(terms) == set(expected) | {"total"}
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value.detach(), rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(total, 0.7 * expected["ce"] + 1.3 * expected["kd"] + 0.4 * expected["feat"],
                               rtol=1e-4, atol=1e-5)
    assert RobustKDLoss(student, teacher, eps=eps, steps=2, jac_weight=0, feat_weight=0).alpha == eps / 2


def test_adversarial_point_options():
    from rkd_fast.train import make_config

    student, teacher = _models()
    for steps in (0, 1.5, True):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            RobustKDLoss(student, teacher, eps=0.1, feat_weight=0, jac_weight=0, steps=steps)
    with pytest.raises(ValueError, match="finite difference runs along the single N-FGSM step"):
        RobustKDLoss(student, teacher, eps=0.1, feat_weight=0, jac_weight=0.5, steps=2)
    with pytest.raises(ValueError, match="they apply with eps"):
        RobustKDLoss(student, teacher, feat_weight=0, steps=2)
    for given in ({"jac_weight": 0.5}, {"distill_at": "clean"}):
        with pytest.raises(ValueError, match="--adv-steps 2 sets the adversarial point"):
            make_config(method="robust-kd", teacher="t.pt", adv_steps=2, **given)
    assert make_config(method="robust-kd", teacher="t.pt", adv_steps=3).adv_steps == 3
    with pytest.raises(ValueError, match="direction do not apply with eps"):
        RobustKDLoss(student, teacher, eps=0.1, feat_weight=0, jacobian={"direction": "rademacher"})
    with pytest.raises(ValueError, match="eps must be > 0"):
        RobustKDLoss(student, teacher, eps=0.0, feat_weight=0)
    with pytest.raises(ValueError, match="unknown teacher_at 'x'"):
        RobustKDLoss(student, teacher, eps=0.1, feat_weight=0, teacher_at="x")
    with pytest.raises(ValueError, match="unknown kd_samples 'some'"):
        RobustKDLoss(student, teacher, eps=0.1, feat_weight=0, kd_samples="some")
    loss_fn = RobustKDLoss(student, teacher, eps=0.1, feat_weight=0, jac_weight=0)
    student.eval()  # (in train mode the first call's update of the running statistics moves the attack pass)
    x, y = digits_batch(12)
    a, _ = loss_fn(x, y, seed=3)
    b, _ = loss_fn(x, y, seed=3)
    c, _ = loss_fn(x, y, seed=4)
    torch.testing.assert_close(a, b)  # the seed fixes the start's noise
    assert not torch.equal(a, c)
