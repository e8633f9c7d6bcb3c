"""SparseQMarginHead against QMarginLoss on the dense cosines of the same normalised embeddings and prototypes."""

import pytest
import torch
import torch.nn.functional as F

import qmargin_spk.losses.candidate_stream as candidate_stream
from qmargin_spk.losses import QMarginLoss, SparseQMarginHead, alpha_divergence_posterior

ALPHAS = [1.25, 1.5, 1.75, 2.0]
NUM_CLASSES, DIM = 1000, 32
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def hard_problem(dtype, seed=0, batch=40):
    """Prototypes and embeddings with ordinary rows, one-hot rows and rows whose target is far outside the support."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    labels[:4] = torch.arange(4)  # one-hot rows: the target owns an axis nobody else uses
    weight[:, :4] *= 0.01
    weight[:4] = 3.0 * torch.eye(DIM, dtype=torch.float64)[:4]
    noise = torch.randn(batch, DIM, generator=gen, dtype=torch.float64)
    embeddings = F.normalize(weight[labels], dim=1) * 4.0 + noise
    embeddings[:4] = weight[:4] + 0.01 * noise[:4]
    embeddings[4:10] = -weight[labels[4:10]] + 0.2 * noise[4:10]  # target outside the support
    embeddings[10:16] = noise[10:16]  # no preference
    return weight.to(dtype), embeddings.to(dtype), labels


def dense_reference(weight, embeddings, labels, alpha, scale, margin):
    """Loss and gradients of QMarginLoss on ``F.normalize(x) @ F.normalize(W).T``, plus the dense posterior."""
    weight = weight.clone().requires_grad_(True)
    embeddings = embeddings.clone().requires_grad_(True)
    cosines = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).T
    loss = QMarginLoss(alpha, scale, margin)(cosines, labels)
    loss.backward()
    p, _ = alpha_divergence_posterior(scale * cosines.detach(), labels, -scale * margin, alpha)
    return loss.detach(), embeddings.grad, weight.grad, p


def head_result(head, embeddings, labels):
    embeddings = embeddings.clone().requires_grad_(True)
    head.weight.grad = None
    loss = head(embeddings, labels)
    loss.backward()
    return loss.detach(), embeddings.grad, head.weight.grad


def make_head(weight, alpha, **kwargs):
    head = SparseQMarginHead(weight.shape[0], weight.shape[1], alpha=alpha, **kwargs).to(weight.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


def assert_same(result, reference, dtype):
    tolerance = TOLERANCE[dtype]
    for got, expected in zip(result, reference):
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_loss_and_gradients_match_dense_qmargin(alpha, dtype):
    weight, embeddings, labels = hard_problem(dtype)
    reference = dense_reference(weight, embeddings, labels, alpha, 10.0, 0.2)
    p = reference[3]
    rows = torch.arange(len(labels))
    assert (p[rows, labels] == 1).any() and (p[rows, labels] == 0).any()  # the batch covers its edge cases
    for chunk_size, capacity in ((97, 1024), (4096, 1024), (128, 4)):
        head = make_head(weight, alpha, chunk_size=chunk_size, capacity=capacity)
        result = head_result(head, embeddings, labels)
        assert_same(result, reference[:3], dtype)
        support = (p > 0).sum(dim=1)
        assert head.stats.support_max == float(support.max())
        assert head.stats.p_target_zero_frac == float((p[rows, labels] == 0).to(torch.float64).mean())
        if capacity == 4:  # rows with a larger support overflowed and took the exact path
            assert head.overflow_count == int((support > 4).sum()) > 0
            assert head.stats.overflow_rows == head.overflow_count
        else:
            assert head.overflow_count == 0


def test_gradient_rows_are_the_support_and_targets_and_backward_does_no_matmul(monkeypatch):
    weight, embeddings, labels = hard_problem(torch.float64, seed=1)
    head = make_head(weight, 1.5, chunk_size=300)
    calls = []
    original = candidate_stream.chunk_logits
    monkeypatch.setattr(candidate_stream, "chunk_logits", lambda *args: calls.append(1) or original(*args))
    loss = head(embeddings, labels)
    assert len(calls) == 4  # ceil(1000 / 300) chunks, once each
    loss.backward()
    assert len(calls) == 4
    p = dense_reference(weight, embeddings, labels, 1.5, 10.0, 0.2)[3]
    touched = (p - F.one_hot(labels, NUM_CLASSES) != 0).any(dim=0)  # one-hot rows touch nothing
    assert torch.equal(head.weight.grad.abs().sum(dim=1) > 0, touched)


def test_speechbrain_shapes_and_margin_scale_changes():
    weight, embeddings, labels = hard_problem(torch.float64, seed=2)
    head = make_head(weight, 1.75, chunk_size=256)
    loss, grad_x, grad_w = head_result(head, embeddings.unsqueeze(1), labels.unsqueeze(1))
    assert grad_x.shape == (len(labels), 1, DIM)
    expected = dense_reference(weight, embeddings, labels, 1.75, 10.0, 0.2)[:3]
    assert_same((loss, grad_x.squeeze(1), grad_w), expected, torch.float64)
    head.margin, head.scale = 0.35, 7.0  # a scheduler changes them between steps
    expected = dense_reference(weight, embeddings, labels, 1.75, 7.0, 0.35)[:3]
    assert_same(head_result(head, embeddings, labels), expected, torch.float64)


@pytest.mark.parametrize("alpha", [1.5, 1.25])
def test_sparse_gradient_equals_dense_gradient(alpha):
    weight, embeddings, labels = hard_problem(torch.float64, seed=3)
    dense = make_head(weight, alpha, chunk_size=200)
    sparse = make_head(weight, alpha, chunk_size=200, capacity=8, sparse_grad=True)
    loss_dense, grad_x_dense, grad_w_dense = head_result(dense, embeddings, labels)
    loss_sparse, grad_x_sparse, grad_w_sparse = head_result(sparse, embeddings, labels)
    assert grad_w_sparse.is_sparse and not grad_w_dense.is_sparse
    torch.testing.assert_close(grad_w_sparse.to_dense(), grad_w_dense, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_x_sparse, grad_x_dense, atol=1e-12, rtol=0)
    touched = (dense_reference(weight, embeddings, labels, alpha, 10.0, 0.2)[3] > 0).any(dim=0)
    touched[labels] = True  # the support of every row and the targets: nothing else is stored
    assert torch.equal(grad_w_sparse.coalesce().indices()[0], touched.nonzero().squeeze(1))
    before = sparse.weight.detach().clone()
    torch.optim.SGD(sparse.parameters(), lr=0.5).step()
    torch.testing.assert_close(sparse.weight.detach(), before - 0.5 * grad_w_dense, atol=1e-12, rtol=0)


def test_state_dict_round_trip_and_speechbrain_classifier_layout():
    from speechbrain.lobes.models.ECAPA_TDNN import Classifier

    classifier = Classifier(input_size=DIM, out_neurons=NUM_CLASSES)
    head = SparseQMarginHead(NUM_CLASSES, DIM, alpha=1.5)
    assert set(head.state_dict()) == set(classifier.state_dict()) == {"weight"}
    bound = (6.0 / (NUM_CLASSES + DIM)) ** 0.5  # xavier_uniform, like Classifier
    largest = float(head.weight.detach().abs().max())
    assert 0.9 * bound < largest <= bound
    head.load_state_dict(classifier.state_dict())
    _, embeddings, labels = hard_problem(torch.float32, seed=4)
    expected = QMarginLoss(1.5, 10.0, 0.2)(classifier(embeddings.unsqueeze(1)), labels.unsqueeze(1))
    torch.testing.assert_close(head(embeddings.unsqueeze(1), labels.unsqueeze(1)), expected, atol=1e-5, rtol=0)
    restored = SparseQMarginHead(NUM_CLASSES, DIM, alpha=1.5)
    restored.load_state_dict(head.state_dict())
    assert torch.equal(restored.weight, head.weight)


def test_half_precision_and_autocast_compute_in_float32():
    weight, embeddings, labels = hard_problem(torch.float32, seed=5)
    head = make_head(weight, 1.5, chunk_size=300)
    half = embeddings.bfloat16()
    loss = head(half.requires_grad_(True), labels)
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == float(head(half.float(), labels).detach())
    loss.backward()
    assert half.grad.dtype == torch.bfloat16 and bool(torch.isfinite(half.grad.float()).all())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = head(embeddings, labels)
    assert under_autocast.dtype == torch.float32
    assert float(under_autocast.detach()) == float(head(embeddings, labels).detach())


def test_bad_inputs_raise_value_errors():
    weight, embeddings, labels = hard_problem(torch.float32, seed=6)
    head = make_head(weight, 1.5)
    with pytest.raises(ValueError, match="alpha"):
        SparseQMarginHead(10, 4, alpha=1.0)
    with pytest.raises(ValueError, match="capacity"):
        SparseQMarginHead(10, 4, capacity=0)
    with pytest.raises(ValueError, match="out of range"):
        head(embeddings, labels + NUM_CLASSES)
    with pytest.raises(ValueError, match="shape"):
        head(embeddings, labels[:-1])
    with pytest.raises(ValueError, match="shape"):
        head(embeddings.reshape(2, -1, DIM), labels)
    bad = embeddings.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        head(bad, labels)
