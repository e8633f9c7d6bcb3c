"""Sub-center AAM with the inter-top-k penalty and SphereFace2, against float64 hand computations in numpy."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qmargin_spk.losses import SphereFace2Loss, SubCenterAAMLoss, build_head
from qmargin_spk.stages.experiment import composed_hparams
from qmargin_spk.stages.train import _initialise_from

HPARAMS = Path(__file__).resolve().parents[1] / "hparams"


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    return float(np.mean(log_z - logits[np.arange(len(targets)), targets]))


def subcenter_aam_by_hand(cos, targets, scale, margin, k, top_k, penalty):
    """Class max over the k sub-centers, angles by arccos, theta_y + m at the target, theta_j - m' at the top-k."""
    class_cos = cos.reshape(cos.shape[0], -1, k).max(axis=2)
    theta = np.arccos(class_cos)
    logits = np.cos(theta)
    for row, y in enumerate(targets):
        others = [j for j in np.argsort(-class_cos[row]) if j != y][:top_k]
        logits[row, others] = np.cos(theta[row, others] - penalty)
        logits[row, y] = np.cos(theta[row, y] + margin)
    return cross_entropy(scale * logits, targets)


def sphereface2_by_hand(cos, targets, scale, margin, lanbuda, t, bias):
    """lanbuda softplus(-(s(g(c_y) - m) + b)) + (1 - lanbuda) sum_{j != y} softplus(s(g(c_j) + m) + b), row mean."""
    g = 2.0 * ((cos + 1.0) / 2.0) ** t - 1.0
    total = 0.0
    for row, y in enumerate(targets):
        total += lanbuda * softplus(-(scale * (g[row, y] - margin) + bias))
        negatives = [j for j in range(cos.shape[1]) if j != y]
        total += (1 - lanbuda) * sum(softplus(scale * (g[row, j] + margin) + bias) for j in negatives)
    return total / len(targets)


def uniform_cosines(seed: int, shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.9, 0.9, size=shape)


def test_class_cosine_is_the_largest_of_its_sub_centers():
    cos = torch.tensor([[0.1, 0.5, -0.2, 0.3, 0.0, 0.9], [0.4, -0.1, 0.2, 0.25, -0.5, -0.6]], dtype=torch.float64)
    class_cos = SubCenterAAMLoss(sub_centers=2).class_cosines(cos)
    torch.testing.assert_close(class_cos, torch.tensor([[0.5, 0.3, 0.9], [0.4, 0.25, -0.5]], dtype=torch.float64))
    with pytest.raises(ValueError, match="not a multiple of sub_centers=4"):
        SubCenterAAMLoss(sub_centers=4).class_cosines(cos)


def test_inter_topk_penalty_moves_exactly_the_k_largest_non_target_cosines():
    # Target 2 has the largest cosine; the two hardest others are classes 4 (0.6) and 0 (0.5).
    cos = torch.tensor([[0.5, -0.3, 0.8, 0.1, 0.6, 0.45]], dtype=torch.float64)
    loss = SubCenterAAMLoss(scale=1.0, margin=0.2, sub_centers=1, top_k=2, penalty=0.1)
    shifted = loss._margin_cosines(cos, torch.tensor([2]))[0].numpy()
    theta = np.arccos(cos[0].numpy())
    expected = np.cos(theta)
    expected[[4, 0]] = np.cos(theta[[4, 0]] - 0.1)
    expected[2] = np.cos(theta[2] + 0.2)
    np.testing.assert_allclose(shifted, expected, rtol=0, atol=1e-12)
    assert np.flatnonzero(shifted != cos[0].numpy()).tolist() == [0, 2, 4]


def test_subcenter_aam_loss_matches_a_float64_hand_computation():
    cos, targets = uniform_cosines(0, (3, 8)), np.array([0, 3, 1])  # B 3, C 4, K 2
    loss = SubCenterAAMLoss(scale=8.0, margin=0.2, sub_centers=2, top_k=2, penalty=0.06)
    value = loss(torch.from_numpy(cos).unsqueeze(1), torch.from_numpy(targets).unsqueeze(1))
    assert value.dtype == torch.float64
    assert float(value) == pytest.approx(subcenter_aam_by_hand(cos, targets, 8.0, 0.2, 2, 2, 0.06), abs=1e-12)
    assert loss.stats.support_mean == 4 and loss.stats.batch_size == 3


def test_inter_topk_penalty_follows_the_margin_ramp_and_stops_at_its_setting():
    cos, targets = uniform_cosines(1, (3, 8)), np.array([2, 0, 3])
    loss = SubCenterAAMLoss(scale=8.0, margin=0.2, sub_centers=2, top_k=2, penalty=0.06)
    for margin, penalty in ((0.1, 0.03), (0.0, 0.0), (0.5, 0.06)):
        loss.margin = margin
        expected = subcenter_aam_by_hand(cos, targets, 8.0, margin, 2, 2, penalty)
        assert float(loss(torch.from_numpy(cos), torch.from_numpy(targets))) == pytest.approx(expected, abs=1e-12)


def test_subcenter_aam_gradient_passes_gradcheck():
    cos = torch.from_numpy(uniform_cosines(2, (2, 6))).requires_grad_()
    loss = SubCenterAAMLoss(scale=4.0, margin=0.2, sub_centers=2, top_k=1, penalty=0.1)
    assert torch.autograd.gradcheck(lambda c: loss(c, torch.tensor([1, 2])), (cos,))


def test_sphereface2_loss_matches_a_float64_hand_computation_on_3x4():
    cos, targets = uniform_cosines(3, (3, 4)), np.array([1, 0, 3])
    loss = SphereFace2Loss(scale=8.0, margin=0.2, lanbuda=0.7, t=3).double()  # a float64 bias too
    with torch.no_grad():
        loss.bias.fill_(-0.4)
    value = loss(torch.from_numpy(cos).unsqueeze(1), torch.from_numpy(targets).unsqueeze(1)).detach()
    assert float(value) == pytest.approx(sphereface2_by_hand(cos, targets, 8.0, 0.2, 0.7, 3, -0.4), abs=1e-12)


def test_sphereface2_is_one_positive_and_c_minus_one_negative_binary_terms():
    cos, targets = torch.tensor([[0.3, 0.7, -0.2]], dtype=torch.float64), torch.tensor([1])
    g = 2.0 * ((np.array([0.3, 0.7, -0.2]) + 1.0) / 2.0) ** 2 - 1.0
    positive_only = SphereFace2Loss(scale=4.0, margin=0.1, lanbuda=1.0, t=2)
    negatives_only = SphereFace2Loss(scale=4.0, margin=0.1, lanbuda=0.0, t=2)
    assert float(positive_only(cos, targets).detach()) == pytest.approx(softplus(-4.0 * (g[1] - 0.1)), abs=1e-12)
    expected_negatives = softplus(4.0 * (g[0] + 0.1)) + softplus(4.0 * (g[2] + 0.1))
    assert float(negatives_only(cos, targets).detach()) == pytest.approx(expected_negatives, abs=1e-12)
    # p_target is the target's own sigmoid, not a softmax share.
    assert positive_only.stats.p_target_mean == pytest.approx(1 / (1 + np.exp(-4.0 * (g[1] - 0.1))), abs=1e-12)
    assert positive_only.stats.support_mean == 3


def test_sphereface2_gradient_passes_gradcheck_and_the_bias_gradient_is_the_hand_derivative():
    cos, targets = uniform_cosines(4, (3, 4)), np.array([0, 3, 2])
    loss = SphereFace2Loss(scale=4.0, margin=0.2, lanbuda=0.7, t=3).double()
    with torch.no_grad():
        loss.bias.fill_(0.3)
    cos_t = torch.from_numpy(cos).requires_grad_()
    assert torch.autograd.gradcheck(lambda c: loss(c, torch.from_numpy(targets)), (cos_t,))
    loss(cos_t, torch.from_numpy(targets)).backward()
    # d/db of softplus(-z) is -sigmoid(-z), of softplus(z) is sigmoid(z); z is affine in b with slope 1.
    g, sigmoid = 2.0 * ((cos + 1.0) / 2.0) ** 3 - 1.0, lambda x: 1.0 / (1.0 + np.exp(-x))
    is_target = np.eye(4, dtype=bool)[targets]
    positive, negative = 4.0 * (g - 0.2) + 0.3, 4.0 * (g + 0.2) + 0.3
    by_hand = np.where(is_target, -0.7 * sigmoid(-positive), 0.3 * sigmoid(negative)).sum(1).mean()
    assert float(loss.bias.grad) == pytest.approx(by_hand, abs=1e-12)


def test_settings_outside_their_range_are_refused():
    with pytest.raises(ValueError, match="sub_centers must be an integer >= 1"):
        SubCenterAAMLoss(sub_centers=0)
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        SubCenterAAMLoss(top_k=-1)
    with pytest.raises(ValueError, match="margin_type 'A' is not implemented"):
        SphereFace2Loss(margin_type="A")
    with pytest.raises(ValueError, match=r"lanbuda must lie in \[0, 1\]"):
        SphereFace2Loss(lanbuda=1.5)


def test_subcenter_head_holds_k_rows_per_class_counts_correct_by_class_and_refuses_c_rows():
    head = build_head(3, 4, "dense", "subcenter_aam", sub_centers=2, top_k=1)
    assert head.weight.shape == (6, 4)
    rows = torch.eye(4)[[0, 1, 2, 3, 0, 1]] + 0.01 * torch.arange(6.0).unsqueeze(1)
    head.load_full_weight(rows)
    embeddings = torch.eye(4)[[3, 2]]  # nearest rows 3 (class 1) and 2 (class 1)
    head(embeddings, torch.tensor([1, 0]))
    assert head.stats.correct == 1
    with pytest.raises(ValueError, match=r"2 prototype\(s\) per class, a \[6, 4\] matrix; cannot load a \[3, 4\]"):
        head.load_full_weight(torch.randn(3, 4))


@pytest.mark.parametrize(
    ("experiment", "rows_per_class"), [("demo_cpu_subcenter_aam.yaml", 3), ("demo_cpu_sphereface2.yaml", 1)]
)
def test_composed_demo_experiment_trains_one_step_with_its_margin_schedule(experiment, rows_per_class):
    torch.manual_seed(0)
    hparams = composed_hparams(HPARAMS / experiment, overrides={"channels": 16})
    dim = hparams["embedding_dim"]
    head = hparams["classifier"](num_classes=5, embedding_dim=dim)
    assert head.weight.shape == (5 * rows_per_class, dim)
    schedule = hparams["margin_schedule"]
    assert schedule(0) == 0.0 and schedule(hparams["margin_ramp_end"]) == hparams["margin"]
    head.margin = schedule(2)
    embeddings = torch.randn(4, 1, dim, requires_grad=True)
    loss = head(embeddings, torch.tensor([[0], [1], [4], [2]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(embeddings.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


@pytest.mark.parametrize(("loss", "settings"), [("subcenter_aam", {"sub_centers": 3}), ("sphereface2", {})])
def test_large_margin_stage_copies_every_sub_center_of_the_kept_classes_and_the_loss_parameters(
    tmp_path, loss, settings
):
    # The initial run had 4 classes; the fine-tuning run keeps the first 2 (its speed classes dropped).
    torch.manual_seed(0)
    trained = build_head(4, 3, "dense", loss, **settings)
    for parameter in trained.parameters():
        torch.nn.init.normal_(parameter)
    torch.save(trained.state_dict(), tmp_path / "classifier.ckpt")
    checkpoint = SimpleNamespace(paramfiles={"classifier": tmp_path / "classifier.ckpt"}, path=tmp_path)
    embedder = SimpleNamespace(state_dict=dict, load_state_dict=lambda state: None)
    initial = SimpleNamespace(
        folder=tmp_path, load_averaged_model=lambda: [checkpoint], hparams={"embedding_model": embedder}
    )
    head = build_head(2, 3, "dense", loss, **settings)
    _initialise_from(SimpleNamespace(hparams={"embedding_model": embedder}), head, initial)
    rows = 2 * settings.get("sub_centers", 1)
    torch.testing.assert_close(head.weight.detach(), trained.weight.detach()[:rows])
    for mine, theirs in zip(head.loss.parameters(), trained.loss.parameters(), strict=True):
        torch.testing.assert_close(mine.detach(), theirs.detach())
