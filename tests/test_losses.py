"""Q-Margin loss family against independent float64 oracles."""

import math

import pytest
import torch
import torch.nn.functional as F

from qmargin_spk.losses import (
    AAMLoss,
    AlphaEntmaxLoss,
    CosFaceLoss,
    PosteriorStats,
    QMarginLoss,
    alpha_divergence_posterior,
    fenchel_young_loss,
)

ALPHAS = [1.25, 1.5, 1.75, 2.0]


def brute_force(theta, target, log_q_target, alpha):
    """p and loss by 200 bisection steps on the full row, straight from the formulas of docs/loss.md."""
    batch = theta.shape[0]
    rows = torch.arange(batch)
    q = torch.ones_like(theta)
    q[rows, target] = torch.exp(torch.as_tensor(log_q_target, dtype=theta.dtype))
    am1 = alpha - 1.0

    def f_prime(u):
        return (u**am1 - 1.0) / am1

    lo = (theta - f_prime(1.0 / q)).amax(dim=1)
    hi = theta.amax(dim=1) - f_prime(1.0 / q.sum(dim=1))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        p = q * torch.clamp(1.0 + am1 * (theta - mid[:, None]), min=0.0) ** (1.0 / am1)
        above = p.sum(dim=1) >= 1.0
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    tau = 0.5 * (lo + hi)
    p = q * torch.clamp(1.0 + am1 * (theta - tau[:, None]), min=0.0) ** (1.0 / am1)
    p = p / p.sum(dim=1, keepdim=True)
    one_hot = F.one_hot(target, theta.shape[1]).to(theta.dtype)

    def divergence(r):  # D_f(r, q) = sum_j q_j f(r_j / q_j)
        u = r / q
        return (q * (u**alpha - 1.0 - alpha * (u - 1.0)) / (alpha * am1)).sum(dim=1)

    loss = (p * theta).sum(dim=1) - divergence(p) + divergence(one_hot) - theta[rows, target]
    return p, loss, p - one_hot


def hard_batch(num_classes=300, batch=48, seed=0):
    """Cosines with ordinary rows, near-uniform rows, rows already one-hot and targets far below the top."""
    gen = torch.Generator().manual_seed(seed)
    cos = (torch.rand(batch, num_classes, generator=gen, dtype=torch.float64) * 2 - 1) * 0.4
    target = torch.randint(0, num_classes, (batch,), generator=gen)
    rows = torch.arange(batch)
    cos[4:8] *= 0.01  # nearly tied rows: large support
    cos[8:12] = -0.9  # one-hot rows: target far above the rest
    cos[rows[8:12], target[8:12]] = 1.0
    cos[rows[12:20], target[12:20]] = -0.95  # target outside the support
    return cos, target


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_posterior_loss_and_gradient_match_brute_force(alpha, margin):
    scale = 10.0
    cos, target = hard_batch()
    theta = scale * cos
    p_ref, loss_ref, grad_ref = brute_force(theta, target, -scale * margin, alpha)
    p, support = alpha_divergence_posterior(theta, target, -scale * margin, alpha)
    torch.testing.assert_close(p, p_ref, atol=1e-10, rtol=0)
    assert torch.equal(support, (p_ref > 0).sum(dim=1))
    # The batch really covers the edge cases it claims to.
    rows = torch.arange(len(target))
    assert (p_ref[rows, target] == 0).any() and (p_ref[rows, target] == 1).any()

    logits = theta.clone().requires_grad_(True)
    loss = fenchel_young_loss(logits, target, -scale * margin, alpha)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref.mean(), atol=1e-10, rtol=0)
    torch.testing.assert_close(logits.grad, grad_ref / len(target), atol=1e-10, rtol=0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_float32_matches_float64_oracle(alpha):
    cos, target = hard_batch(seed=1)
    theta = 10.0 * cos
    p_ref, loss_ref, _ = brute_force(theta, target, -2.0, alpha)
    p, _ = alpha_divergence_posterior(theta.float(), target, -2.0, alpha)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.double(), p_ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(len(target)), atol=1e-6, rtol=0)
    loss = fenchel_young_loss(theta.float(), target, -2.0, alpha)
    assert abs(float(loss) - float(loss_ref.mean())) < 1e-4


@pytest.mark.parametrize("alpha", [1.0, 1.3, 1.5, 2.0])
def test_gradcheck(alpha):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, 7, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    target = torch.tensor([0, 3, 6, 2, 2])
    assert torch.autograd.gradcheck(
        lambda x: fenchel_young_loss(x, target, -1.5, alpha), (logits,), eps=1e-6, atol=1e-6
    )


def test_finite_differences_equal_p_minus_e_y():
    gen = torch.Generator().manual_seed(4)
    theta = torch.randn(1, 9, generator=gen, dtype=torch.float64) * 3
    target = torch.tensor([4])
    p, _ = alpha_divergence_posterior(theta, target, -2.0, 1.75)
    expected = p[0] - F.one_hot(target, 9)[0]
    h = 1e-6
    for j in range(9):
        bump = torch.zeros_like(theta)
        bump[0, j] = h
        numeric = (
            fenchel_young_loss(theta + bump, target, -2.0, 1.75) - fenchel_young_loss(theta - bump, target, -2.0, 1.75)
        ) / (2 * h)
        assert abs(float(numeric) - float(expected[j])) < 1e-6


def test_alpha_one_is_cosface_cross_entropy():
    cos, target = hard_batch(seed=2)
    scale, margin = 30.0, 0.2
    one_hot = F.one_hot(target, cos.shape[1]).to(cos.dtype)
    cosface_logits = scale * (cos - margin * one_hot)
    reference = F.cross_entropy(cosface_logits, target)
    torch.testing.assert_close(CosFaceLoss(scale, margin)(cos, target), reference, atol=1e-12, rtol=0)
    torch.testing.assert_close(QMarginLoss(1.0, scale, margin)(cos, target), reference, atol=1e-12, rtol=0)
    # The general (Halley) path just above alpha = 1 is close to the closed form.
    softer = QMarginLoss(1.0 + 1e-4, 10.0, margin)(cos, target)
    torch.testing.assert_close(softer, F.cross_entropy(10.0 * (cos - margin * one_hot), target), atol=5e-3, rtol=0)


def entmax15_closed_form(x):
    """entmax15 by the sort-based formula of Peters et al. (2019), written independently here."""
    x = x / 2
    x = x - x.max(dim=1, keepdim=True).values
    xs, _ = torch.sort(x, dim=1, descending=True)
    k = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)
    mean = xs.cumsum(1) / k
    mean_sq = (xs**2).cumsum(1) / k
    ss = k * (mean_sq - mean**2)
    delta = torch.clamp((1 - ss) / k, min=0)
    tau = mean - torch.sqrt(delta)
    support = (tau <= xs).sum(dim=1, keepdim=True)
    tau_star = tau.gather(1, support - 1)
    return torch.clamp(x - tau_star, min=0) ** 2


def sparsemax_closed_form(x):
    xs, _ = torch.sort(x, dim=1, descending=True)
    k = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)
    cums = xs.cumsum(1)
    support = ((1 + k * xs) > cums).sum(dim=1, keepdim=True)
    tau = (cums.gather(1, support - 1) - 1) / support
    return torch.clamp(x - tau, min=0)


@pytest.mark.parametrize("alpha,closed_form", [(1.5, entmax15_closed_form), (2.0, sparsemax_closed_form)])
def test_zero_margin_is_alpha_entmax(alpha, closed_form):
    cos, target = hard_batch(seed=5)
    theta = 10.0 * cos
    p, _ = alpha_divergence_posterior(theta, target, 0.0, alpha)
    torch.testing.assert_close(p, closed_form(theta), atol=1e-12, rtol=0)
    loss_entmax = AlphaEntmaxLoss(alpha, 10.0)(cos, target)
    loss_q0 = QMarginLoss(alpha, 10.0, 0.0)(cos, target)
    assert float(loss_entmax) == float(loss_q0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_zero_loss_margin_gap(alpha):
    scale, margin = 10.0, 0.2
    gap = math.exp(scale * margin * (alpha - 1)) / (alpha - 1)  # in logits
    target = torch.tensor([2])
    for delta, zero in ((1e-6, True), (-0.02 * gap, False)):
        theta = torch.zeros(1, 6, dtype=torch.float64)
        theta[0, 2] = gap + delta
        loss = fenchel_young_loss(theta, target, -scale * margin, alpha)
        assert (abs(float(loss)) < 1e-12) == zero, (delta, float(loss))
        assert float(loss) >= -1e-12


def test_modules_accept_speechbrain_shapes_and_expose_statistics():
    cos, target = hard_batch(seed=6)
    cos = cos.float()
    for loss_fn in (QMarginLoss(1.5, 10.0, 0.2), AlphaEntmaxLoss(2.0, 10.0), CosFaceLoss(), AAMLoss()):
        flat = loss_fn(cos, target)
        nested = loss_fn(cos.unsqueeze(1), target.unsqueeze(1), length=torch.ones(len(target)))
        assert flat.shape == () and float(flat) == float(nested)
        assert isinstance(loss_fn.stats, PosteriorStats) and loss_fn.stats.batch_size == len(target)
    sparse = QMarginLoss(1.5, 10.0, 0.2)
    sparse(cos, target)
    p, _ = alpha_divergence_posterior(10.0 * cos.double(), target, -2.0, 1.5)
    p_target = p[torch.arange(len(target)), target]
    assert sparse.stats.support_max == float((p > 0).sum(dim=1).max())
    assert abs(sparse.stats.p_target_mean - float(p_target.mean())) < 1e-5
    assert sparse.stats.p_target_zero_frac == float((p_target == 0).double().mean())


def test_margin_and_scale_change_during_training():
    cos, target = hard_batch(seed=7)
    for loss_fn in (QMarginLoss(1.5, 10.0, 0.0), AAMLoss(30.0, 0.0), CosFaceLoss(30.0, 0.0)):
        before = float(loss_fn(cos, target))
        loss_fn.margin = 0.3
        after = float(loss_fn(cos, target))
        assert after > before
        loss_fn.scale = loss_fn.scale * 0.5
        assert float(loss_fn(cos, target)) != after


def test_aam_matches_speechbrain():
    from speechbrain.nnet.losses import AdditiveAngularMargin, LogSoftmaxWrapper

    cos, target = hard_batch(seed=8)
    cos = cos.float()
    reference = LogSoftmaxWrapper(AdditiveAngularMargin(margin=0.2, scale=30.0))(cos.unsqueeze(1), target.unsqueeze(1))
    torch.testing.assert_close(AAMLoss(30.0, 0.2)(cos, target), reference, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_value_errors():
    cos, target = hard_batch(seed=9)
    with pytest.raises(ValueError, match="alpha"):
        QMarginLoss(alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        fenchel_young_loss(cos, target, 0.0, 0.9)
    bad = cos.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        QMarginLoss()(bad, target)
    with pytest.raises(ValueError, match="out of range"):
        QMarginLoss()(cos, target + cos.shape[1])
    with pytest.raises(ValueError, match="out of range"):
        AAMLoss()(cos, target - 100)
    with pytest.raises(ValueError, match="shape"):
        QMarginLoss()(cos, target[:-1])
    with pytest.raises(ValueError, match="shape"):
        CosFaceLoss()(cos.reshape(2, -1, cos.shape[1]), target)
