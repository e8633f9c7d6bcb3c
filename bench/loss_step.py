"""Forward + backward time of each loss on B x C cosines; prints JSON.

    python bench/loss_step.py [--batch 256] [--classes 5994] [--repeats 30]

Cosines come from L2-normalised random embeddings and prototypes (D = 192) with each
embedding pulled towards its class prototype, so the rows look like mid-training ones.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from qmargin_spk.losses import AAMLoss, AlphaEntmaxLoss, QMarginLoss


def make_cosines(batch: int, classes: int, dim: int = 192, pull: float = 1.2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(classes, dim, generator=gen), dim=1)
    targets = torch.randint(0, classes, (batch,), generator=gen)
    embeddings = F.normalize(torch.randn(batch, dim, generator=gen) + pull * prototypes[targets] * dim**0.5 / 4, dim=1)
    return embeddings @ prototypes.T, targets


def time_step(loss_fn, cosines, targets, repeats: int) -> dict:
    times = []
    for i in range(repeats + 3):
        leaf = cosines.clone().requires_grad_(True)
        start = time.perf_counter()
        loss = loss_fn(leaf.unsqueeze(1), targets.unsqueeze(1))
        loss.backward()
        elapsed = time.perf_counter() - start
        if i >= 3:  # warm-up
            times.append(elapsed)
    result = {"ms_median": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times), "loss": float(loss)}
    stats = getattr(loss_fn, "stats", None)
    if stats:
        result.update({k: stats[k] for k in ("support_mean", "support_max", "p_target_mean")})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=5994)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    from speechbrain.nnet.losses import AdditiveAngularMargin, LogSoftmaxWrapper

    torch.manual_seed(0)
    cosines, targets = make_cosines(args.batch, args.classes)
    losses = {
        "qmargin_a1.5_s10_m0.2": QMarginLoss(1.5, 10.0, 0.2),
        "qmargin_a1.75_s10_m0.2": QMarginLoss(1.75, 10.0, 0.2),
        "entmax_a1.5_s10": AlphaEntmaxLoss(1.5, 10.0),
        "speechbrain_aam_s30_m0.2": LogSoftmaxWrapper(AdditiveAngularMargin(margin=0.2, scale=30.0)),
        "ours_aam_s30_m0.2": AAMLoss(30.0, 0.2),
    }
    results = {name: time_step(fn, cosines, targets, args.repeats) for name, fn in losses.items()}
    reference = results["speechbrain_aam_s30_m0.2"]["ms_median"]
    for result in results.values():
        result["ratio_to_speechbrain_aam"] = result["ms_median"] / reference
    print(json.dumps({
        "batch": args.batch,
        "classes": args.classes,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "target": "qmargin ratio_to_speechbrain_aam <= 1.3",
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
