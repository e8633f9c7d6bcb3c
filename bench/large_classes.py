"""Step time and peak extra memory with very many classes: dense AAM, dense Q-Margin, the sparse head; prints JSON.

    python bench/large_classes.py [--classes 5994 100000 1000000] [--quick] [--device cpu]

Each configuration runs in a fresh subprocess. One step is forward + backward of a batch of
``B = 256`` embeddings against ``C x D`` prototypes (``weight.grad`` set to None before each step, as
``optimizer.zero_grad()`` does). Embeddings sit at cosine ~0.6 from their class prototype, the rest
is noise, so the posteriors look like mid-training ones (support size is reported).

Peak extra memory is what a step needs beyond the prototypes and their gradient buffer: on CPU,
the peak resident set size during the step (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) minus the resident size at the start of the step with the prototypes
and a prototype-sized buffer standing for the gradient resident; on CUDA,
``max_memory_allocated`` during the step minus the same baseline.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

BATCH = 256
TARGET_COSINE = 0.6
METHODS = ("dense_aam", "dense_qmargin", "sparse_head")
MEMORY_METHOD = (
    "CPU: VmHWM (reset via /proc/self/clear_refs) during one step minus VmRSS at step start with the "
    "prototypes and a prototype-sized gradient buffer resident, fresh subprocess per config; "
    "CUDA: max_memory_allocated minus memory_allocated with the same baseline"
)


def make_batch(classes: int, dim: int, device: str, seed: int = 0):
    """Prototypes and embeddings at cosine ~TARGET_COSINE from their class prototype."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=gen)
    labels = torch.randint(0, classes, (BATCH,), generator=gen)
    noise = F.normalize(torch.randn(BATCH, dim, generator=gen), dim=1)
    anchor = F.normalize(weight[labels], dim=1)
    embeddings = TARGET_COSINE * anchor + (1 - TARGET_COSINE**2) ** 0.5 * noise
    return weight.to(device), embeddings.to(device), labels.to(device)


def build_step(method: str, weight: torch.nn.Parameter):
    """A callable running forward + backward of one method, and the object holding its statistics."""
    from qmargin_spk.losses import AAMLoss, QMarginLoss, SparseQMarginHead

    if method == "sparse_head":
        head = SparseQMarginHead(weight.shape[0], weight.shape[1], alpha=1.5, scale=10.0, margin=0.2).to(weight.device)
        head.weight = weight
        return lambda x, y: head(x, y).backward(), head
    loss_fn = AAMLoss(30.0, 0.2) if method == "dense_aam" else QMarginLoss(1.5, 10.0, 0.2)

    def step(x, y):
        loss_fn(F.linear(F.normalize(x), F.normalize(weight)), y).backward()

    return step, loss_fn


class MemoryProbe:
    """Peak memory of a block of work above the memory in use when it starts (CPU RSS or CUDA allocator)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.base = _proc_status_kb("VmRSS") * 1024

    def peak_extra_mb(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (_proc_status_kb("VmHWM") * 1024 - self.base) / 2**20


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{key}:\s+(\d+) kB", handle.read()).group(1))


def run_one(method: str, classes: int, dim: int, repeats: int, device: str) -> dict:
    """Time and peak extra memory of one configuration, in this process."""
    weight, embeddings, labels = make_batch(classes, dim, device)
    weight = torch.nn.Parameter(weight)
    step, holder = build_step(method, weight)
    embeddings.requires_grad_(True)
    step(embeddings, labels)  # warm-up
    times = []
    for _ in range(repeats):
        weight.grad = embeddings.grad = None
        _sync(device)
        start = time.perf_counter()
        step(embeddings, labels)
        _sync(device)
        times.append(time.perf_counter() - start)
    weight.grad = embeddings.grad = None
    gradient_buffer = torch.ones_like(weight)  # stands for the gradient the step is about to produce
    probe = MemoryProbe(device)
    probe.start()
    del gradient_buffer
    step(embeddings, labels)
    result = {
        "ms_median": 1e3 * statistics.median(times),
        "ms_all": [round(1e3 * t, 1) for t in times],
        "peak_extra_mb": probe.peak_extra_mb(),
    }
    stats = holder.stats
    result.update({k: stats[k] for k in ("support_mean", "support_max", "p_target_mean") if k in stats})
    if method == "sparse_head":
        result["overflow_rows"] = holder.overflow_count
    return result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_in_subprocess(method: str, classes: int, dim: int, repeats: int, device: str) -> dict:
    command = [sys.executable, __file__, "--one", method, str(classes), str(dim), str(repeats), "--device", device]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[5994, 100_000, 1_000_000])
    parser.add_argument("--quick", action="store_true", help="1 timed repeat, no D=512 run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", nargs=4, metavar=("METHOD", "CLASSES", "DIM", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, classes, dim, repeats = args.one
        print(json.dumps(run_one(method, int(classes), int(dim), int(repeats), args.device)))
        return
    configs = [(classes, 192) for classes in args.classes]
    if not args.quick and 1_000_000 in args.classes:
        configs.append((1_000_000, 512))
    results = []
    for classes, dim in configs:
        repeats = 1 if args.quick else (3 if classes >= 1_000_000 else 5)
        entry = {"classes": classes, "dim": dim, "batch": BATCH, "repeats": repeats}
        for method in METHODS:
            entry[method] = run_in_subprocess(method, classes, dim, repeats, args.device)
        dense = entry["dense_aam"]
        entry["sparse_time_ratio_to_dense_aam"] = entry["sparse_head"]["ms_median"] / dense["ms_median"]
        entry["sparse_memory_ratio_to_dense_aam"] = entry["sparse_head"]["peak_extra_mb"] / dense["peak_extra_mb"]
        results.append(entry)
        print(json.dumps(entry), file=sys.stderr)
    print(json.dumps({
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "settings": "AAM s=30 m=0.2; Q-Margin alpha=1.5 s=10 m=0.2; sparse head default chunk_size/capacity",
        "memory_method": MEMORY_METHOD,
        "targets_at_1M": "sparse peak_extra_mb <= 0.1 x dense_aam, ms_median <= 0.6 x dense_aam",
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
