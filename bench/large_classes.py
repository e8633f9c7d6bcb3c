"""Step time and peak extra memory with very many classes: dense AAM, dense Q-Margin, the sparse head; prints JSON.

    python bench/large_classes.py [--classes 5994 100000 1000000] [--quick] [--threads N] [--device cpu]

Each configuration runs in a fresh subprocess. One step is forward + backward of ``B = 256``
embeddings against ``C x D`` prototypes, with ``weight.grad`` set to None before it (what
``optimizer.zero_grad()`` does). Embeddings sit at cosine 0.6 from their class prototype plus
noise, so the posteriors look like mid-training ones (support size is reported).

Peak extra memory is what a step needs beyond the prototypes and their gradient:
``max(forward peak - base, backward peak - base - gradient size)``, ``base`` the memory in use
before the step (prototypes resident, no gradient). On CPU the peaks are the resident set high-water
mark (``VmHWM``, reset through ``/proc/self/clear_refs`` before each phase), measured in a subprocess
of its own started with ``MALLOC_MMAP_THRESHOLD_=65536`` so that every tensor is its own mapping and
leaves the resident set when freed; on CUDA they come from ``max_memory_allocated``.

On a CPU shared with other busy processes use ``--threads 1``: with two threads, every one of the
sparse head's many small parallel ops waits for a descheduled thread, which inflates its time
several-fold while the few large dense ops barely notice.
"""

from __future__ import annotations

import argparse
import json
import os
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
    "max(forward peak - base, backward peak - base - C*D*itemsize); base = memory in use before the step "
    "with the prototypes resident and no gradient. CPU: VmHWM reset via /proc/self/clear_refs per phase, "
    "in a fresh subprocess per config started with MALLOC_MMAP_THRESHOLD_=65536 (timed in another one). "
    "CUDA: max_memory_allocated after reset_peak_memory_stats."
)
MALLOC_FOR_MEASURING = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors leave the resident set


def make_batch(classes: int, dim: int, device: str, seed: int = 0):
    """Prototypes and embeddings at cosine TARGET_COSINE from their class prototype."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=gen)
    labels = torch.randint(0, classes, (BATCH,), generator=gen)
    noise = torch.randn(BATCH, dim, generator=gen)
    anchor = F.normalize(weight[labels], dim=1)
    noise = F.normalize(noise - (noise * anchor).sum(dim=1, keepdim=True) * anchor, dim=1)  # orthogonal to anchor
    embeddings = TARGET_COSINE * anchor + (1 - TARGET_COSINE**2) ** 0.5 * noise
    return weight.to(device), embeddings.to(device), labels.to(device)


def build_forward(method: str, weight: torch.nn.Parameter):
    """A callable giving the loss of one method, and the object holding its statistics."""
    from qmargin_spk.losses import AAMLoss, QMarginLoss, SparseQMarginHead

    if method == "sparse_head":
        head = SparseQMarginHead(weight.shape[0], weight.shape[1], alpha=1.5, scale=10.0, margin=0.2)
        head.weight = weight
        return head, head
    loss_fn = AAMLoss(30.0, 0.2) if method == "dense_aam" else QMarginLoss(1.5, 10.0, 0.2)

    def forward(x, y):
        return loss_fn(F.linear(F.normalize(x), F.normalize(weight)), y)

    return forward, loss_fn


class MemoryProbe:
    """High-water mark of memory in use since ``reset`` (CPU resident set or CUDA allocator)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def in_use(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else 1024 * _proc_status_kb("VmRSS")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return 1024 * _proc_status_kb("VmHWM")


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{key}:\s+(\d+) kB", handle.read()).group(1))


def peak_extra_mb(forward, weight, embeddings, labels, device: str) -> dict:
    """Peak memory of one step beyond the prototypes and their gradient, forward and backward apart."""
    weight.grad = embeddings.grad = None
    probe = MemoryProbe(device)
    base = probe.in_use()
    probe.reset()
    loss = forward(embeddings, labels)
    forward_extra = probe.peak() - base
    probe.reset()
    loss.backward()
    backward_extra = probe.peak() - base - weight.numel() * weight.element_size()
    return {"peak_extra_mb": max(forward_extra, backward_extra) / 2**20, "forward_peak_extra_mb": forward_extra / 2**20}


def run_one(method: str, classes: int, dim: int, repeats: int, warmup: int, device: str, measure: str) -> dict:
    """Time (``measure == "time"``) or peak extra memory of one configuration, in this process."""
    weight, embeddings, labels = make_batch(classes, dim, device)
    weight = torch.nn.Parameter(weight)
    forward, holder = build_forward(method, weight)
    embeddings.requires_grad_(True)
    times = []
    for i in range(warmup + (repeats if measure == "time" else 0)):
        weight.grad = embeddings.grad = None
        _sync(device)
        start = time.perf_counter()
        forward(embeddings, labels).backward()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if measure != "time":
        return peak_extra_mb(forward, weight, embeddings, labels, device)
    result = {"ms_median": 1e3 * statistics.median(times), "ms_all": [round(1e3 * t, 1) for t in times]}
    result.update({k: holder.stats[k] for k in ("support_mean", "support_max", "p_target_mean")})
    if method == "sparse_head":
        result["overflow_rows"] = holder.overflow_count
    return result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_in_subprocess(method: str, classes: int, dim: int, repeats: int, warmup: int, args) -> dict:
    """Time, then memory, of one configuration, each in a fresh process."""
    result = {}
    for measure in ("time", "memory"):
        command = [
            sys.executable,
            __file__,
            "--one",
            method,
            str(classes),
            str(dim),
            str(repeats),
            str(warmup),
            measure,
            "--device",
            args.device,
            "--threads",
            str(args.threads),
        ]
        env = dict(os.environ, **(MALLOC_FOR_MEASURING if measure == "memory" else {}))
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        result.update(json.loads(done.stdout))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[5994, 100_000, 1_000_000])
    parser.add_argument("--quick", action="store_true", help="one timed step per config, no D=512 run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        method, classes, dim, repeats, warmup, measure = args.one
        print(json.dumps(run_one(method, int(classes), int(dim), int(repeats), int(warmup), args.device, measure)))
        return
    configs = [(classes, 192) for classes in args.classes]
    if not args.quick and 1_000_000 in args.classes:
        configs.append((1_000_000, 512))
    results = []
    for classes, dim in configs:
        huge = classes * dim >= 100_000_000  # a dense step takes many seconds: no warm-up, two timed steps
        repeats = 1 if args.quick else (2 if huge else 5)
        entry = {"classes": classes, "dim": dim, "batch": BATCH}
        for method in METHODS:
            warmup = 0 if huge and method != "sparse_head" else 1
            entry[method] = run_in_subprocess(method, classes, dim, repeats, warmup, args)
        dense = entry["dense_aam"]
        entry["sparse_time_ratio_to_dense_aam"] = entry["sparse_head"]["ms_median"] / dense["ms_median"]
        entry["sparse_memory_ratio_to_dense_aam"] = entry["sparse_head"]["peak_extra_mb"] / dense["peak_extra_mb"]
        results.append(entry)
        print(json.dumps(entry), file=sys.stderr)
    print(
        json.dumps(
            {
                "device": args.device,
                "threads": args.threads,
                "torch": torch.__version__,
                "machine": platform.machine(),
                "settings": "AAM s=30 m=0.2; Q-Margin alpha=1.5 s=10 m=0.2; "
                "sparse head default chunk_size and capacity",
                "inputs": f"random prototypes, embeddings at cosine {TARGET_COSINE} from their class prototype",
                "memory_method": MEMORY_METHOD,
                "targets_at_1M": "sparse peak_extra_mb <= 0.1 x dense_aam, ms_median <= 0.6 x dense_aam",
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
