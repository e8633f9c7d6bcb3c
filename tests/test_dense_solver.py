"""The dense solver's fast paths against float64 oracles.

The group-maxima probe, Newton in blocks, the scale folded in, bf16 input.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qmargin_spk.losses import QMarginLoss, alpha_divergence_posterior, fenchel_young_loss, solve_sparse_posterior
from qmargin_spk.losses import threshold as solver
from test_losses import brute_force, hard_batch


def mid_training_cosines(batch=64, classes=1000, seed=0):
    """Rows like a training batch: each embedding pulled towards its class prototype."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(classes, 32, generator=gen, dtype=torch.float64), dim=1)
    target = torch.randint(0, classes, (batch,), generator=gen)
    embeddings = F.normalize(
        torch.randn(batch, 32, generator=gen, dtype=torch.float64) + 1.5 * prototypes[target], dim=1
    )
    return embeddings @ prototypes.T, target


def target_ties(classes=200, batch=8, seed=0):
    """Rows whose target shares the largest logit with 1 to 4 other classes (in other probe groups)."""
    gen = torch.Generator().manual_seed(seed)
    cos = torch.rand(batch, classes, generator=gen, dtype=torch.float64) * 0.4 - 0.2
    target = torch.randint(0, classes, (batch,), generator=gen)
    for row in range(batch):
        cos[row, (target[row] + 3 * torch.arange(row % 4 + 2)) % classes] = 0.5
    return cos, target


@pytest.mark.parametrize("alpha", [2.5, 3.0])
@pytest.mark.parametrize("log_q_target", [-2.0, 1.0])
@pytest.mark.parametrize("batch", ["hard", "mid_training"])
def test_alpha_above_two_matches_brute_force(alpha, log_q_target, batch):
    cos, target = hard_batch(seed=10) if batch == "hard" else mid_training_cosines(batch=16)
    theta = 10.0 * cos
    p_ref, loss_ref, grad_ref = brute_force(theta, target, log_q_target, alpha)
    p, support = alpha_divergence_posterior(theta, target, log_q_target, alpha)
    torch.testing.assert_close(p, p_ref, atol=1e-10, rtol=0)
    assert torch.equal(support, (p_ref > 0).sum(dim=1))
    logits = theta.clone().requires_grad_(True)
    loss = fenchel_young_loss(logits, target, log_q_target, alpha)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref.mean(), atol=1e-10, rtol=0)
    torch.testing.assert_close(logits.grad, grad_ref / len(target), atol=1e-10, rtol=0)


@pytest.mark.parametrize("alpha", [1.25, 1.5, 1.75, 2.0])
@pytest.mark.parametrize("classes", [300, 50])
def test_target_prior_above_one_and_class_counts_off_the_probe_groups(alpha, classes):
    """q_y > 1 (a negative margin), C = 4 x 64 + 44 columns, and C below the 64 probe groups."""
    for cos, target in (hard_batch(num_classes=classes, seed=12), target_ties(classes)):
        theta = 10.0 * cos
        p_ref, _, _ = brute_force(theta, target, 1.0, alpha)
        p, support = alpha_divergence_posterior(theta, target, 1.0, alpha)
        torch.testing.assert_close(p, p_ref, atol=1e-10, rtol=0)
        assert torch.equal(support, (p_ref > 0).sum(dim=1))


def test_mass_does_not_increase_with_alpha():
    """At every tau each class's mass q (1 + (a-1)(theta - tau))_+^(1/(a-1)) shrinks as alpha grows.

    This is why tau at alpha 2 (or 1.5) bounds tau at 1.5 < alpha < 2 (or alpha < 1.5) from below.
    """
    x = torch.linspace(-3.0, 3.0, 601, dtype=torch.float64)
    alphas = [1.01, 1.1, 1.25, 1.5, 1.75, 2.0, 3.0, 5.0]
    mass = torch.stack([torch.clamp(1.0 + (a - 1.0) * x, min=0.0) ** (1.0 / (a - 1.0)) for a in alphas])
    assert (mass[1:] <= mass[:-1] * (1 + 1e-12)).all()


@pytest.mark.parametrize("alpha", [1.25, 1.5, 1.75, 1.9, 2.0, 3.0])
@pytest.mark.parametrize("log_q_target", [-2.0, 1.0])
def test_group_maxima_bound_lies_below_tau(alpha, log_q_target):
    for name, (cos, target) in {
        "hard": hard_batch(seed=13),
        "mid_training": mid_training_cosines(),
        "target_ties": target_ties(),
    }.items():
        theta = 10.0 * cos
        tau = solve_sparse_posterior(theta, target, log_q_target, alpha).tau
        log_q = torch.full((len(target),), log_q_target, dtype=theta.dtype)
        bound = solver.group_maxima_tau(
            cos, cos.gather(1, target.unsqueeze(1)), log_q, alpha, 10.0, solver.DENSE_PROBE_GROUPS
        )
        assert (bound <= tau).all()
        if name == "mid_training" and log_q_target <= 0 and alpha <= 2:  # the training case: close to tau
            assert (bound > tau - 0.1 / (alpha - 1.0)).all()


class _Counter(TorchDispatchMode):
    """Counts host syncs (reading a value back) among the ATen calls."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.syncs += func.overloadpacket.__name__ == "_local_scalar_dense"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_newton_syncs_once_per_block_not_per_step(monkeypatch, dtype):
    cos, target = mid_training_cosines()
    steps = []
    step = solver._newton_step
    monkeypatch.setattr(solver, "_newton_step", lambda *args: steps.append(1) or step(*args))
    with _Counter() as counter:
        solve_sparse_posterior(10.0 * cos.to(dtype), target, -2.0, 1.75)
    blocks = (len(steps) - solver._PROBE_STEPS) // solver._NEWTON_BLOCK
    assert len(steps) == solver._PROBE_STEPS + blocks * solver._NEWTON_BLOCK
    # Validation, the candidate count, one convergence test per block; the probe has none.
    assert counter.syncs == 2 + blocks
    assert len(steps) > counter.syncs


@pytest.mark.parametrize("alpha", [1.5, 1.75])
def test_bfloat16_cosines_solve_like_their_float32_values(alpha):
    cos, target = hard_batch(seed=14)
    half = cos.to(torch.bfloat16).requires_grad_(True)
    single = cos.to(torch.bfloat16).float().requires_grad_(True)
    loss_half = QMarginLoss(alpha, 10.0, 0.2)(half, target)
    loss_single = QMarginLoss(alpha, 10.0, 0.2)(single, target)
    assert loss_half.dtype == torch.bfloat16
    assert float(loss_half.detach()) == float(loss_single.detach().to(torch.bfloat16))
    loss_half.backward()
    loss_single.backward()
    assert half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(half.grad.float(), single.grad, atol=1e-4, rtol=1e-2)


def test_scale_folded_in_equals_scaled_logits():
    cos, target = mid_training_cosines(seed=3)
    for alpha in (1.5, 1.75):
        folded = fenchel_young_loss(cos, target, -2.0, alpha, scale=10.0)
        scaled = fenchel_young_loss(10.0 * cos, target, -2.0, alpha)
        torch.testing.assert_close(folded, scaled, atol=1e-12, rtol=0)
