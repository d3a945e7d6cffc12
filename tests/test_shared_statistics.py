"""rkd_fast.clean_pass.share_clean_statistics: the student's clean and perturbed passes as one batched call, each
BatchNorm normalising the perturbed rows with the clean rows' batch statistics. It must compute what the
two-call scheme computes (losses, logits, gradients, running statistics), inside RobustKDLoss too (features
recorded from the batched call), and work under torch.compile, where the two-call scheme is refused."""

import copy

import pytest
import torch
from _digits_model import digits_batch, tiny_cnn

from rkd_fast import RobustKDLoss
from rkd_fast.clean_pass import share_clean_statistics
from rkd_fast.jacobian import jacobian_penalty

pytestmark = pytest.mark.cross_path  # `make test` runs it again on ATen's portable kernels


# float64: the finite difference divides rounding differences by h (convolutions of a batch of 2N round
# differently than of N), which in float32 moves gradients by up to ~1%; in float64 both schemes agree closely.
def _models(seed=0):
    return tiny_cnn(seed).double().train(), tiny_cnn(seed + 1).double().eval()


def _run(student, teacher, x, y, **kwargs):
    torch.manual_seed(7)  # the same subset and directions for both schemes
    loss, s_logits, _ = jacobian_penalty(student, x, y, teacher=teacher, return_outputs=True, **kwargs)
    grads = torch.autograd.grad(loss + s_logits.square().mean(), list(student.parameters()))
    return loss, s_logits, grads


def _assert_same(two_calls, batched, model_a, model_b):
    for a, b in zip(two_calls, batched):
        for u, v in zip(*(t if isinstance(t, (list, tuple)) else (t,) for t in (a, b))):
            torch.testing.assert_close(u, v, rtol=1e-7, atol=1e-10)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)  # running statistics: updated once, by the clean rows


@pytest.mark.parametrize("kwargs", [{}, {"fraction": 0.5}, {"direction": "grad"}, {"norm": "linf", "h": 1e-2},
                                    {"on": "probs", "temperature": 2.0}], ids=str)
def test_batched_call_matches_two_calls(kwargs):
    student, teacher = _models()
    shared = share_clean_statistics(copy.deepcopy(student))
    x, y = digits_batch(8, seed=3, dtype=torch.float64)
    _assert_same(_run(student, teacher, x, y, **kwargs), _run(shared, teacher, x, y, **kwargs), student, shared)


def test_conversion_keeps_state_and_plain_behaviour():
    student, _ = _models()
    shared = share_clean_statistics(copy.deepcopy(student))
    assert list(shared.state_dict()) == list(student.state_dict())
    assert all("SharedStatistics" in type(m).__name__ for m in shared.modules() if "BatchNorm" in type(m).__name__)
    x, _ = digits_batch(8, seed=3, dtype=torch.float64)
    torch.testing.assert_close(shared(x), student(x))  # outside jacobian_penalty: an ordinary BatchNorm
    torch.testing.assert_close(shared.state_dict(), student.state_dict())
    assert share_clean_statistics(shared) is shared  # converting twice changes nothing


def test_robust_kd_loss_with_features_matches():
    student, teacher = _models()
    shared = share_clean_statistics(copy.deepcopy(student))
    x, y = digits_batch(8, seed=3, dtype=torch.float64)
    results = []
    for model in (student, shared):
        loss_fn = RobustKDLoss(model, teacher, feature_pairs=[("block2", "block2")], example_input=x, jac_weight=1.0)
        torch.manual_seed(7)
        total, terms = loss_fn(x, y)
        results.append((terms, torch.autograd.grad(total, list(model.parameters()))))
    (terms_a, grads_a), (terms_b, grads_b) = results
    for name in terms_a:
        torch.testing.assert_close(terms_a[name], terms_b[name], rtol=1e-7, atol=1e-10, msg=name)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_compiled_student_with_shared_statistics():
    student, teacher = _models()
    compiled = share_clean_statistics(copy.deepcopy(student))
    compiled.compile()
    x, y = digits_batch(8, seed=3, dtype=torch.float64)
    _assert_same(_run(student, teacher, x, y), _run(compiled, teacher, x, y), student, compiled)
