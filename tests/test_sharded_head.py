"""ShardedQMarginHead on 2 gloo processes against one process holding every prototype."""

import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from qmargin_spk.losses import QMarginLoss
from qmargin_spk.losses.sharded_head import ShardedQMarginHead, shard_range
from qmargin_spk.training.brain import sum_gradients

WORLD = 2
NUM_CLASSES, DIM = 1001, 24
BATCH_PER_RANK = (20, 13)  # unequal batches on purpose
CONFIGS = [  # alpha, chunk_size, capacity, sparse_grad
    (1.5, 97, 1024, False),
    (1.25, 128, 3, False),  # Halley solver, rows overflow
    (2.0, 4096, 8, True),
]


def problem():
    """Prototypes, the global batch (rank 0's rows first) and labels, float64; some rows one-hot or target-far."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen, dtype=torch.float64)
    batch = sum(BATCH_PER_RANK)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    labels[:2] = torch.tensor([0, 1000])  # one-hot rows, one target per shard
    weight[:, :2] *= 0.01
    weight[[0, 1000]] = 3.0 * torch.eye(DIM, dtype=torch.float64)[:2]
    noise = torch.randn(batch, DIM, generator=gen, dtype=torch.float64)
    embeddings = 4.0 * F.normalize(weight[labels], dim=1) + noise
    embeddings[:2] = weight[labels[:2]]
    embeddings[2:6] = -weight[labels[2:6]]
    return weight, embeddings, labels


def worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    weight, embeddings, labels = problem()
    start = sum(BATCH_PER_RANK[:rank])
    rows = slice(start, start + BATCH_PER_RANK[rank])
    results = []
    for alpha, chunk_size, capacity, sparse_grad in CONFIGS:
        head = ShardedQMarginHead(
            NUM_CLASSES, DIM, alpha=alpha, chunk_size=chunk_size, capacity=capacity, sparse_grad=sparse_grad
        ).double()
        head.load_full_weight(weight)
        local = embeddings[rows].clone().requires_grad_(True)
        loss = head(local.unsqueeze(1), labels[rows].unsqueeze(1))
        loss.backward()
        grad = head.weight.grad.to_dense() if sparse_grad else head.weight.grad
        results.append(
            {
                "loss": loss.detach(),
                "grad_x": local.grad.squeeze(1),
                "grad_w": grad,
                "sparse": head.weight.grad.is_sparse,
                "shard": (head.shard_start, head.shard_stop),
                "overflow": head.overflow_count,
                "stats": dataclasses.asdict(head.stats),
            }
        )
    head.weight.data.mul_(rank + 2.0)
    encoder_grad = encoder_gradient_through_ddp(rank, weight, embeddings, labels)
    torch.save(
        {"results": results, "full_weight": head.full_weight(), "encoder_grad": encoder_grad},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def make_encoder():
    torch.manual_seed(1)
    return torch.nn.Linear(DIM, DIM, dtype=torch.float64)


def encoder_gradient_through_ddp(rank, weight, embeddings, labels):
    """An encoder under DDP with the recipe's summing hook, trained through the sharded head."""
    start = sum(BATCH_PER_RANK[:rank])
    rows = slice(start, start + BATCH_PER_RANK[rank])
    encoder = make_encoder()
    wrapped = DistributedDataParallel(encoder)
    wrapped.register_comm_hook(None, sum_gradients)
    head = ShardedQMarginHead(NUM_CLASSES, DIM, alpha=1.5).double()
    head.load_full_weight(weight)
    head(wrapped(embeddings[rows]), labels[rows]).backward()
    return encoder.weight.grad


def test_ddp_with_the_summing_hook_gives_the_single_process_encoder_gradient(rank_results):
    weight, embeddings, labels = problem()
    encoder = make_encoder()
    cosines = F.normalize(encoder(embeddings), dim=1) @ F.normalize(weight, dim=1).T
    QMarginLoss(1.5, 10.0, 0.2)(cosines, labels).backward()
    for rank in range(WORLD):  # DDP's default averaging would give half of it
        torch.testing.assert_close(rank_results[rank]["encoder_grad"], encoder.weight.grad, atol=1e-10, rtol=0)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("sharded"))
    mp.spawn(worker, args=(free_port(), out_dir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{rank}.pt")) for rank in range(WORLD)]


def test_shard_ranges_cover_the_classes_contiguously():
    assert [shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [shard_range(NUM_CLASSES, r, WORLD) for r in range(WORLD)] == [(0, 501), (501, 1001)]


@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_two_ranks_equal_one_process(rank_results, config):
    alpha, _, capacity, sparse_grad = CONFIGS[config]
    weight, embeddings, labels = problem()
    weight.requires_grad_(True)
    embeddings.requires_grad_(True)
    cosines = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).T
    loss = QMarginLoss(alpha, 10.0, 0.2)(cosines, labels)
    loss.backward()
    start = 0
    for rank in range(WORLD):
        got = rank_results[rank]["results"][config]
        shard = slice(*got["shard"])
        rows = slice(start, start + BATCH_PER_RANK[rank])
        start += BATCH_PER_RANK[rank]
        torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-10, rtol=0)
        torch.testing.assert_close(got["grad_x"], embeddings.grad[rows], atol=1e-10, rtol=0)
        torch.testing.assert_close(got["grad_w"], weight.grad[shard], atol=1e-10, rtol=0)
        assert got["sparse"] == sparse_grad
    stats = [rank_results[rank]["results"][config]["stats"] for rank in range(WORLD)]
    assert (
        stats[0]["support_mean"] == stats[1]["support_mean"] and stats[0]["p_target_mean"] == stats[1]["p_target_mean"]
    )
    overflow = sum(rank_results[rank]["results"][config]["overflow"] for rank in range(WORLD))
    if capacity == 3:
        assert overflow > 0
    if capacity == 1024:
        assert overflow == 0


def test_full_weight_is_assembled_on_rank_zero(rank_results):
    weight, _, _ = problem()
    assert rank_results[1]["full_weight"] is None
    expected = torch.cat([weight[:501] * 2.0, weight[501:] * 3.0])
    assert torch.equal(rank_results[0]["full_weight"], expected)
