"""The Triton kernel of feature_distance against the pure PyTorch reference: forward, gradients, layouts,
dtypes, odd shapes, opcheck and torch.compile. On CPU it runs under TRITON_INTERPRET=1 (see conftest.py), so
shapes are small."""

import _feature_distance_contract as contract
import pytest
import torch

import rkd_fast
from rkd_fast.ops import _reference
from rkd_fast.ops.feature_distance import MODE_IDS, REDUCTION_IDS

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# relative to the largest magnitude of the expected tensor: the kernels and the reference both accumulate in
# fp32 (fp64), but in a different order, and round gradients to the input dtype separately
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def kernel_module():
    from rkd_fast.ops.triton import feature_distance  # imports triton, after conftest set the interpreter up
    return feature_distance


def assert_close(actual, expected, dtype, what, loss=False):
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    scale = expected.detach().double().abs().nan_to_num(0.0, 0.0, 0.0).max().item() if expected.numel() else 0.0
    if loss:
        # modes 1 and 2 form the loss as ‖x̂‖² + ‖ŷ‖² - 2 x̂·ŷ from the sums: an absolute error of a few
        # rounding units of 1 (the losses lie in [0, 4]), even when the loss itself is ~0
        scale = max(scale, 1.0)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-30), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def layout(x, kind):
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # every other column of a wider tensor: neither layout, copied by the public function
        wide = torch.cat([x, x], dim=-1)
        return wide[..., ::2]
    return x.contiguous()


def make(shape, dtype, device, kind="contiguous"):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    return layout(x, kind).to(device)


def run_ops(student, teacher, mode, p=2.0, needs=(True, True)):
    """The Triton op called directly: (per-sample losses, gradient of their sum for the student, for the teacher)."""
    return torch.ops.rkd_fast.feature_distance_fwd_triton(student, teacher, MODE_IDS[mode], p, REDUCTION_IDS["none"],
                                                          *needs)


def compare(student, teacher, mode, p=2.0, reduction="none", check_grads=True):
    """The loss and both gradients of backend="triton" against backend="reference", with a random weight per
    sample in the backward so that the per-sample scaling of the saved gradients is tested too."""
    dtype = student.dtype
    out = {}
    for backend in ("triton", "reference"):
        s = student.detach().clone().requires_grad_(check_grads)
        t = teacher.detach().clone().requires_grad_(check_grads)
        loss = rkd_fast.feature_distance(s, t, mode=mode, p=p, reduction=reduction, backend=backend)
        grads = (None, None)
        if check_grads:
            weight = torch.rand(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(1))
            (loss * weight.to(loss.device)).sum().backward()
            grads = (s.grad, t.grad)
        out[backend] = (loss.detach(), *grads)
    got, want = out["triton"], out["reference"]
    assert_close(got[0], want[0], dtype, f"{mode} loss", loss=True)
    if check_grads:
        assert_close(got[1], want[1], dtype, f"{mode} student grad")
        assert_close(got[2], want[2], dtype, f"{mode} teacher grad")
    return got


@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["mse", "normalized", "attention"])
def test_matches_reference(mode, dtype, kind, device):
    student = make((3, 5, 6, 7), dtype, device, kind)
    teacher = make((3, 4 if mode == "attention" else 5, 6, 7), dtype, device, kind)
    compare(student, teacher, mode, p=2.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["mse", "normalized", "attention"])
def test_reductions(mode, reduction, device):
    student = make((4, 3, 5, 5), torch.float32, device)
    teacher = make((4, 3, 5, 5), torch.float32, device)
    loss = compare(student, teacher, mode, reduction=reduction)[0]
    assert loss.shape == ((4,) if reduction == "none" else ())


@pytest.mark.parametrize("shape", [(1, 7, 11, 13), (5, 37), (2, 3, 1, 1), (3, 2, 1, 5)], ids=str)
@pytest.mark.parametrize("mode", ["mse", "normalized"])
def test_odd_shapes_flat(mode, shape, device):
    compare(make(shape, torch.float32, device), make(shape, torch.float32, device), mode)


def test_mse_one_dim_input(device):
    compare(make((7,), torch.float32, device), make((7,), torch.float32, device), "mse")


def test_normalized_single_element_samples(device):
    """With one element per sample x̂ = sign(x): the loss is 0 or 4 and the gradient is 0 up to rounding
    (where a comparison relative to the reference's own rounding noise means nothing)."""
    student, teacher = make((6,), torch.float32, device), make((6,), torch.float32, device)
    losses, grad_s, grad_t = run_ops(student, teacher, "normalized")
    assert_close(losses, (student.sign() - teacher.sign()).pow(2), torch.float32, "loss")
    assert grad_s.abs().max() < 1e-5 and grad_t.abs().max() < 1e-5


@pytest.mark.parametrize("shapes", [((1, 7, 11, 13), (1, 3, 11, 13)), ((2, 1, 5, 1), (2, 3, 5, 1)),
                                    ((2, 3, 1, 13), (2, 2, 1, 13))], ids=str)
@pytest.mark.parametrize("kinds", [("contiguous", "contiguous"), ("channels_last", "contiguous"),
                                   ("contiguous", "channels_last")], ids="-".join)
def test_odd_shapes_attention(shapes, kinds, device):
    student = make(shapes[0], torch.float32, device, kinds[0])
    teacher = make(shapes[1], torch.float32, device, kinds[1])
    compare(student, teacher, "attention")


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_attention_single_position(kind, device):
    """H·W = 1: both normalised maps are 1, so the loss and the gradients are 0 up to rounding (the
    reference's exact zeros leave nothing to compare relative to)."""
    student = make((4, 8, 1, 1), torch.float32, device, kind)
    teacher = make((4, 2, 1, 1), torch.float32, device, kind)
    losses, grad_s, grad_t = run_ops(student, teacher, "attention")
    assert losses.abs().max() < 1e-6
    assert grad_s.abs().max() < 1e-5 and grad_t.abs().max() < 1e-5


@pytest.mark.parametrize("p", [1.0, 1.5, 3.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_attention_p(p, dtype, device):
    student = make((2, 5, 4, 6), dtype, device, "channels_last")
    teacher = make((2, 3, 4, 6), dtype, device)
    compare(student, teacher, "attention", p=p)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0])
def test_attention_relu_features(p, device):
    """Exact zeros (ReLU maps): d|F|^p/dF is 0 at F = 0 for p >= 1, in the reference and the kernel."""
    student = make((2, 6, 5, 5), torch.float32, device).relu()
    teacher = make((2, 4, 5, 5), torch.float32, device).relu()
    compare(student, teacher, "attention", p=p)


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_attention_gradient_at_zero_small_p(p, device):
    """For p < 1, |F|^p has no derivative at F = 0 (p·0^(p-1)·sign(0) = inf·0): the kernel uses the subgradient
    0 there, as the reference does, and matches it everywhere else."""
    student = make((2, 3, 4, 4), torch.float32, device)
    student[0, 1, 2, 3] = 0.0
    teacher = make((2, 2, 4, 4), torch.float32, device).relu()  # exact zeros in the teacher's maps too
    grad_s, grad_t = compare(student, teacher, "attention", p=p)[1:]
    assert grad_s.isfinite().all() and grad_t.isfinite().all()
    assert grad_s[0, 1, 2, 3] == 0 and (grad_t[teacher == 0] == 0).all()


@pytest.mark.parametrize("scale", [1e18, 1e20, 1e37])
@pytest.mark.parametrize("mode", ["mse", "normalized", "attention"])
def test_large_values(mode, scale, device):
    """Squares of values above ~1.8e19 overflow float32: the kernel redoes such a sample on x/max|x|. Against the
    float64 reference on the same values, where nothing overflows (mse from 1e20 on is inf in float32 itself)."""
    p = 4.0 if mode == "attention" else 2.0
    student = (make((2, 8, 4, 4), torch.float64, device) * scale).float().requires_grad_()
    teacher = (make((2, 5 if mode == "attention" else 8, 4, 4), torch.float64, device) * scale).float()
    losses = rkd_fast.feature_distance(student, teacher, mode=mode, p=p, reduction="none", backend="triton")
    (grad,) = torch.autograd.grad(losses.sum(), student)
    s64 = student.detach().double().requires_grad_()
    expected = _reference.feature_distance(s64, teacher.double(), mode=mode, p=p, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected.sum(), s64)
    tol = 4 * torch.finfo(torch.float32).eps * 128  # float32 sums of 128 terms, generously
    torch.testing.assert_close(losses, expected.float(), rtol=tol, atol=0)
    if losses.isfinite().all():
        assert grad.isfinite().all()
        torch.testing.assert_close(grad.double(), expected_grad, rtol=tol,
                                   atol=tol * expected_grad.abs().max().item() + torch.finfo(torch.float32).tiny)


@pytest.mark.parametrize("mode", ["mse", "normalized", "attention"])
def test_empty_batch(mode, device):
    student = make((0, 3, 4, 4), torch.float32, device).requires_grad_()
    teacher = make((0, 3, 4, 4), torch.float32, device).requires_grad_()
    losses = rkd_fast.feature_distance(student, teacher, mode=mode, reduction="none", backend="triton")
    assert losses.shape == (0,) and losses.dtype == torch.float32
    losses.sum().backward()
    assert student.grad.shape == student.shape and teacher.grad.shape == teacher.shape


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0/0
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
def test_empty_samples(device):
    """D = 0: the mean of no elements is NaN (as in the reference); the distance of two empty vectors is 0."""
    student = make((3, 0), torch.float32, device)
    teacher = make((3, 0), torch.float32, device)
    mse = compare(student, teacher, "mse")[0]
    assert mse.isnan().all()
    normalized = compare(student, teacher, "normalized")[0]
    assert (normalized == 0).all()
    attention = compare(make((2, 3, 0, 4), torch.float32, device), make((2, 2, 0, 4), torch.float32, device),
                        "attention")[0]
    assert (attention == 0).all()


def test_attention_without_channels(device):
    """C = 0: the student's map is 0, so loss = ‖0 - â_t‖² = 1 and the teacher's gradient (that of ‖â_t‖²)
    is 0 up to rounding."""
    student, teacher = make((2, 0, 3, 3), torch.float32, device), make((2, 2, 3, 3), torch.float32, device)
    losses, grad_s, grad_t = run_ops(student, teacher, "attention")
    assert_close(losses, torch.ones(2, device=device), torch.float32, "loss", loss=True)
    assert grad_s.shape == student.shape and grad_t.abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["normalized", "attention"])
def test_zero_norm_sample(mode, device):
    """A sample whose norm is below the 1e-12 floor: the normalisation divides by the floor, no projection."""
    student = make((3, 2, 3, 3), torch.float64, device)
    teacher = make((3, 2, 3, 3), torch.float64, device)
    student[1] = 0.0
    loss = compare(student, teacher, mode)[0]
    assert loss[1].item() == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("mode", ["mse", "normalized", "attention"])
def test_nan_and_inf_propagate(mode, device):
    student = make((3, 2, 4, 4), torch.float32, device)
    teacher = make((3, 2, 4, 4), torch.float32, device)
    student[0, 1, 2, 2] = float("nan")
    teacher[2, 0, 0, 1] = float("inf")
    losses, grad_s, grad_t = run_ops(student, teacher, mode)
    assert losses[0].isnan() and not losses[2].isfinite()  # mse of an inf is inf, the normalised ones NaN
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    expected = _reference.feature_distance(s, t, mode=mode, reduction="none")
    expected.sum().backward()
    assert_close(losses, expected.detach(), torch.float32, "losses", loss=True)
    assert grad_s[0].isnan().any() and grad_t[0].isnan().any()
    assert grad_s[1].isfinite().all() and grad_t[1].isfinite().all()
    assert_close(grad_s[1], s.grad[1], torch.float32, "student grad of the clean sample")
    assert_close(grad_t[1], t.grad[1], torch.float32, "teacher grad of the clean sample")


def test_many_chunks(monkeypatch, device):
    """Force the path a large input takes: many chunks per sample, in the forward and the backward."""
    module = kernel_module()
    config = module._config

    def many_programs(dev):
        cfg = dict(config(dev))
        cfg.update(programs=64)
        return cfg

    monkeypatch.setattr(module, "_config", many_programs)
    for mode in ("mse", "normalized", "attention"):
        student = make((3, 4, 9, 10), torch.float32, device, "channels_last")
        teacher = make((3, 2 if mode == "attention" else 4, 9, 10), torch.float32, device, "channels_last")
        compare(student, teacher, mode)


@pytest.mark.parametrize("needs", [(True, False), (False, True), (False, False)], ids=str)
def test_gradient_flags(needs, device):
    student, teacher = make((2, 3, 4, 5), torch.float16, device), make((2, 3, 4, 5), torch.float16, device)
    losses, grad_s, grad_t = run_ops(student, teacher, "normalized", needs=needs)
    assert losses.dtype == torch.float32
    for need, grad, x in ((needs[0], grad_s, student), (needs[1], grad_t, teacher)):
        if need:
            assert grad.shape == x.shape and grad.dtype == x.dtype and grad.stride() == x.stride()
        else:
            assert grad.shape == (0,) and grad.dtype == x.dtype
    expected = _reference.feature_distance(student, teacher, mode="normalized", reduction="none")
    assert_close(losses, expected, torch.float16, "loss")


def test_channels_last_gradient_keeps_strides(device):
    student = make((2, 3, 4, 5), torch.float32, device, "channels_last")
    teacher = make((2, 6, 4, 5), torch.float32, device)
    _, grad_s, grad_t = run_ops(student, teacher, "attention")
    assert grad_s.stride() == student.stride() and grad_t.stride() == teacher.stride()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["mse", "normalized", "attention"])
def test_op_reduces_and_weights_the_gradient(mode, reduction, device):
    """The op's loss is reduced as asked, and its gradients are those of that loss: the per-sample gradients of
    reduction "none" (the gradient of their sum) divided by N for the mean."""
    fwd = torch.ops.rkd_fast.feature_distance_fwd_triton
    student = make((3, 4, 5, 5), torch.float64, device)
    teacher = make((3, 2 if mode == "attention" else 4, 5, 5), torch.float64, device)
    losses, unit_s, unit_t = fwd(student, teacher, MODE_IDS[mode], 2.0, REDUCTION_IDS["none"], True, True)
    loss, grad_s, grad_t = fwd(student, teacher, MODE_IDS[mode], 2.0, REDUCTION_IDS[reduction], True, True)
    expected = {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]
    eps = 8 * torch.finfo(torch.float64).eps  # the same float64 sums, 1/N applied before or after the products
    torch.testing.assert_close(loss, expected, rtol=eps, atol=0)
    factor = 1 / 3 if reduction == "mean" else 1.0
    for grad, unit in ((grad_s, unit_s), (grad_t, unit_t)):
        torch.testing.assert_close(grad, unit * factor, rtol=eps, atol=eps * unit.abs().max().item())


@pytest.mark.parametrize("mode", ["mse", "normalized", "attention"])
def test_backward_scales_by_the_upstream_gradient(mode, device):
    """Sample i's gradients are weight[i] times those of weight 1; a NaN weight gives NaN gradients for its sample
    only."""
    student = make((3, 3, 4, 5), torch.float32, device)
    teacher = make((3, 2 if mode == "attention" else 3, 4, 5), torch.float32, device)
    _, unit_s, unit_t = run_ops(student, teacher, mode)
    weight = torch.tensor([0.5, -3.0, float("nan")], device=device)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    losses = rkd_fast.feature_distance(s, t, mode=mode, reduction="none", backend="triton")
    grad_s, grad_t = torch.autograd.grad(losses, (s, t), weight)
    for grad, unit in ((grad_s, unit_s), (grad_t, unit_t)):
        assert_close(grad[:2], unit[:2] * weight[:2, None, None, None], torch.float32, f"{mode} scaled grad")
        assert grad[2].isnan().all()


def test_contract_errors(device):
    # The contract the C++ kernels keep too (tests/_feature_distance_contract.py).
    for args, error, message in contract.forward_cases(make((2, 3, 4, 5), torch.float32, device)):
        with pytest.raises(error, match=message):
            kernel_module().forward(*args)


@pytest.mark.parametrize("mode", ["mse", "normalized", "attention"])
def test_opcheck(mode, device):
    student = make((2, 3, 4, 5), torch.float32, device, "channels_last").requires_grad_()
    teacher = make((2, 2 if mode == "attention" else 3, 4, 5), torch.float32, device, "channels_last")
    for reduction in ("mean", "none"):
        torch.library.opcheck(torch.ops.rkd_fast.feature_distance_fwd_triton,
                              (student, teacher, MODE_IDS[mode], 1.5, REDUCTION_IDS[reduction], True, False))


def test_opcheck_both_gradients_half(device):
    student = make((3, 2, 3, 3), torch.bfloat16, device).requires_grad_()
    teacher = make((3, 2, 3, 3), torch.bfloat16, device).requires_grad_()
    torch.library.opcheck(torch.ops.rkd_fast.feature_distance_fwd_triton,
                          (student, teacher, MODE_IDS["normalized"], 2.0, REDUCTION_IDS["sum"], True, True))


@pytest.mark.parametrize("mode", ["normalized", "attention"])
def test_torch_compile_fullgraph(mode, device):
    def loss_fn(s, t):
        return rkd_fast.feature_distance(s, t, mode=mode, reduction="mean", backend="triton") * 3.0

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    student = make((3, 4, 5, 5), torch.float32, device, "channels_last").requires_grad_()
    teacher = make((3, 2 if mode == "attention" else 4, 5, 5), torch.float32, device).requires_grad_()
    loss = compiled(student, teacher)
    loss.backward()
    s, t = student.detach().clone().requires_grad_(), teacher.detach().clone().requires_grad_()
    expected = _reference.feature_distance(s, t, mode=mode) * 3.0
    expected.backward()
    assert_close(loss.detach(), expected.detach(), torch.float32, "compiled loss")
    assert_close(student.grad, s.grad, torch.float32, "compiled student grad")
    assert_close(teacher.grad, t.grad, torch.float32, "compiled teacher grad")
