"""Forward + backward of each loss on B x C cosines: ATen ops, host syncs, time per step alone and under load (JSON).

    python bench/loss_step.py [--batch 256] [--classes 5994] [--repeats 30] [--threads 1 2]
                              [--load_threads 2] [--no_load] [--device cpu|cuda] [--dtype float32|bfloat16]

Cosines come from L2-normalised random embeddings and prototypes (D = 192) with each
embedding pulled towards its class prototype, so the rows look like mid-training ones.

- ``aten_ops_per_step``: ATen operator calls of one forward + backward (a ``TorchDispatchMode``
  sees every call below autograd, the backward's included); each is a kernel launch on a GPU.
- ``host_syncs_per_step``: calls that make the host wait for the device: reading a value
  (``.item()``, ``int()``, ``float()``, ``bool()`` on a tensor: ``aten._local_scalar_dense``) and
  ops whose output size depends on the data (``nonzero``, boolean indexing, ``bincount``, ...).
  On a CPU they cost nothing extra; on a GPU each one drains the launch queue.
- Times: the losses' steps are interleaved (one step of each per round, the first loss rotating),
  so a change in machine load hits them alike; ratios compare medians of the same run. "loaded"
  repeats the measurement while a competing process does matrix products with ``--load_threads``
  threads (started before, stopped after), the situation of a training process sharing its cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qmargin_spk.losses import AAMLoss, AlphaEntmaxLoss, QMarginLoss

# Ops whose output shape depends on tensor values: a GPU must finish the work before the host can go on.
DATA_DEPENDENT_SHAPE_OPS = {
    "nonzero",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "bincount",
    "repeat_interleave",
    "masked_scatter",
    "histc",
}
READ_VALUE_OPS = {"_local_scalar_dense", "equal", "is_nonzero"}
SPEECHBRAIN_AAM = "speechbrain_aam_s30_m0.2"
OURS_AAM = "ours_aam_s30_m0.2"
LOAD_SCRIPT = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(512, 512)
print("ready", flush=True)
while True:
    a = torch.tanh(a @ a)
"""


def make_cosines(batch: int, classes: int, dim: int = 192, pull: float = 1.2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(classes, dim, generator=gen), dim=1)
    targets = torch.randint(0, classes, (batch,), generator=gen)
    embeddings = F.normalize(torch.randn(batch, dim, generator=gen) + pull * prototypes[targets] * dim**0.5 / 4, dim=1)
    return embeddings @ prototypes.T, targets


def build_losses() -> dict:
    from speechbrain.nnet.losses import AdditiveAngularMargin, LogSoftmaxWrapper

    return {
        "qmargin_a1.5_s10_m0.2": QMarginLoss(1.5, 10.0, 0.2),
        "qmargin_a1.75_s10_m0.2": QMarginLoss(1.75, 10.0, 0.2),
        "qmargin_a2.0_s10_m0.2": QMarginLoss(2.0, 10.0, 0.2),
        "entmax_a1.5_s10": AlphaEntmaxLoss(1.5, 10.0),
        SPEECHBRAIN_AAM: LogSoftmaxWrapper(AdditiveAngularMargin(margin=0.2, scale=30.0)),
        OURS_AAM: AAMLoss(30.0, 0.2),
    }


def one_step(loss_fn, cosines: torch.Tensor, targets: torch.Tensor, leaf: torch.Tensor | None = None) -> torch.Tensor:
    """Forward + backward on ``[B, 1, C]`` cosines (a fresh leaf, as a classifier's output would be)."""
    leaf = cosines.clone().requires_grad_(True) if leaf is None else leaf
    loss = loss_fn(leaf.unsqueeze(1), targets.unsqueeze(1))
    loss.backward()
    return loss


class OpCounter(TorchDispatchMode):
    """Counts ATen operator calls, and among them those that force a host-device sync."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name in READ_VALUE_OPS or name in DATA_DEPENDENT_SHAPE_OPS or _boolean_indexing(name, args):
            self.syncs[name] += 1
        return func(*args, **(kwargs or {}))


def _boolean_indexing(name: str, args) -> bool:
    """``x[mask]`` / ``x[mask] = v``: the mask is turned into indices (a nonzero) inside the op."""
    if name not in ("index", "index_put", "index_put_", "_index_put_impl_") or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)


def count_ops(loss_fn, cosines: torch.Tensor, targets: torch.Tensor) -> dict:
    one_step(loss_fn, cosines, targets)  # warm-up: lazy initialisation is not part of a step
    leaf = cosines.clone().requires_grad_(True)
    with OpCounter() as counter:
        one_step(loss_fn, cosines, targets, leaf)
    return {
        "aten_ops_per_step": sum(counter.ops.values()),
        "host_syncs_per_step": sum(counter.syncs.values()),
        "syncs_by_op": dict(counter.syncs),
        "top_ops": dict(counter.ops.most_common(8)),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(losses: dict, cosines, targets, repeats: int, device: str, warmup: int = 3) -> dict:
    """Median and fastest step time of every loss, one step of each per round (the first one rotating)."""
    names = list(losses)
    times = {name: [] for name in names}
    for round_number in range(warmup + repeats):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            start = time.perf_counter()
            one_step(losses[name], cosines, targets)
            _sync(device)
            if round_number >= warmup:
                times[name].append(time.perf_counter() - start)
    result = {
        name: {"ms_median": round(1e3 * statistics.median(t), 3), "ms_min": round(1e3 * min(t), 3)}
        for name, t in times.items()
    }
    for reference, key in ((SPEECHBRAIN_AAM, "ratio_to_speechbrain_aam"), (OURS_AAM, "ratio_to_ours_aam")):
        for entry in result.values():
            entry[key] = round(entry["ms_median"] / result[reference]["ms_median"], 3)
    return result


class CompetingLoad:
    """A separate process doing matrix products on ``threads`` threads while the block runs."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> CompetingLoad:
        self.process = subprocess.Popen(
            [sys.executable, "-c", LOAD_SCRIPT, str(self.threads)], stdout=subprocess.PIPE, text=True
        )
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the competing load process did not start")
        time.sleep(0.5)  # let it reach its steady state
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def posterior_summary(losses: dict, cosines, targets) -> dict:
    summary = {}
    for name, loss_fn in losses.items():
        loss = one_step(loss_fn, cosines, targets)
        stats = getattr(loss_fn, "stats", None)
        summary[name] = {"loss": round(float(loss.detach()), 6)}
        if stats is not None:
            summary[name].update(
                support_mean=stats.support_mean,
                support_max=stats.support_max,
                p_target_mean=round(stats.p_target_mean, 6),
            )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=5994)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts to measure")
    parser.add_argument("--load_threads", type=int, default=2, help="threads of the competing process")
    parser.add_argument("--no_load", action="store_true", help="skip the measurement under load")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the cosines")
    args = parser.parse_args()
    load_before = os.getloadavg()
    cosines, targets = make_cosines(args.batch, args.classes)
    cosines = cosines.to(device=args.device, dtype=getattr(torch, args.dtype))
    targets = targets.to(args.device)
    losses = build_losses()
    torch.set_num_threads(args.threads[0])
    counts = {name: count_ops(fn, cosines, targets) for name, fn in losses.items()}
    timings = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        entry = {"threads": threads, "alone": time_interleaved(losses, cosines, targets, args.repeats, args.device)}
        if not args.no_load:
            with CompetingLoad(args.load_threads):
                entry["loaded"] = time_interleaved(losses, cosines, targets, args.repeats, args.device)
            entry["loaded_over_alone"] = {
                name: round(entry["loaded"][name]["ms_median"] / entry["alone"][name]["ms_median"], 3)
                for name in losses
            }
        timings.append(entry)
        print(json.dumps(entry), file=sys.stderr)
    print(
        json.dumps(
            {
                "what": "forward + backward of each loss on [B, 1, C] cosines (SpeechBrain's classifier output)",
                "batch": args.batch,
                "classes": args.classes,
                "device": args.device,
                "dtype": args.dtype,
                "repeats": args.repeats,
                "load": None
                if args.no_load
                else f"a second process doing 512x512 matmuls on {args.load_threads} threads during 'loaded'",
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
                "cpus": os.cpu_count(),
                "note": "shared machine: other engineers' jobs run at the same time (see load average); compare ratios "
                "measured in the same run rather than absolute times",
                "target": "qmargin ratio_to_speechbrain_aam <= 1.3",
                "torch": torch.__version__,
                "machine": platform.machine(),
                "counts": counts,
                "timings": timings,
                "posterior": posterior_summary(losses, cosines, targets),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
