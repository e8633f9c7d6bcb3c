"""Samples per second of a whole training step for each loss, many class counts; prints JSON.

    python bench/train_step.py [--classes 5994 17982] [--channels 512] [--batch 32] [--crop 2]
                               [--steps 3] [--warmup 1] [--device cpu|cuda] [--bf16] [--threads 1]
                               [--methods aam cosface qmargin_a1.5 qmargin_a1.75 sparse]
                               [--dense_max_classes 200000] [--aam_max_classes 1000000]

One step = Fbank features + ECAPA-TDNN forward/backward + classifier and loss + SGD step
(momentum 0.9, Nesterov, weight decay 1e-4, as the recipe), on random noise waveforms with
random labels (the same input for every method). Dense methods use SpeechBrain's cosine
``Classifier`` with ``AAMLoss`` (s 32, m 0.2), ``CosFaceLoss`` (s 32, m 0.2) or ``QMarginLoss``
(s 7.5, m 0.2, alpha 1.5 / 1.75); ``sparse`` is ``SparseQMarginHead`` (alpha 1.75, s 7.5, m 0.2),
the settings of ``hparams/vox2_ecapa_*.yaml``. All methods start from the same weights and their
steps are interleaved (one step of each per round, the first method rotating), so a change in
machine load hits them alike; ``ratio_to_aam`` compares throughputs measured in the same run.
``head_fwd_bwd_ms_median`` times, apart, forward + backward of the classifier and loss alone on
the step's embeddings: the part of the step that differs between methods.
Dense methods are skipped above ``--dense_max_classes`` (on a CPU a dense step at 1M classes
takes seconds and gigabytes per method; raise the limit on a GPU), except dense AAM, the
reference of the ratios, which runs up to ``--aam_max_classes``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

DENSE = ("aam", "cosface", "qmargin_a1.5", "qmargin_a1.75")
METHODS = DENSE + ("sparse",)
EMBEDDING_DIM = 192


def build_embedder(channels: int, device: str) -> torch.nn.Module:
    """The vox2 experiment's ECAPA-TDNN embedder with ``channels``, composed as the recipe composes it."""
    from qmargin_spk.stages.experiment import composed_hparams

    hparams = composed_hparams(
        REPO / "hparams" / "vox2_ecapa_qmargin.yaml", overrides={"channels": channels, "embedding_dim": EMBEDDING_DIM}
    )
    return hparams["embedder"].to(device)  # weights drawn after the experiment's own seed_everything


def build_head(method: str, classes: int, device: str):
    """``(classifier module, loss(embeddings, labels))`` of one method."""
    from speechbrain.lobes.models.ECAPA_TDNN import Classifier

    from qmargin_spk.losses import AAMLoss, CosFaceLoss, QMarginLoss, SparseQMarginHead

    torch.manual_seed(1)
    if method == "sparse":
        head = SparseQMarginHead(classes, EMBEDDING_DIM, alpha=1.75, scale=7.5, margin=0.2).to(device)
        return head, head
    loss_fn = {
        "aam": lambda: AAMLoss(32.0, 0.2),
        "cosface": lambda: CosFaceLoss(32.0, 0.2),
        "qmargin_a1.5": lambda: QMarginLoss(1.5, 7.5, 0.2),
        "qmargin_a1.75": lambda: QMarginLoss(1.75, 7.5, 0.2),
    }[method]()
    classifier = Classifier(input_size=EMBEDDING_DIM, out_neurons=classes).to(device)

    def loss(embeddings, labels):
        return loss_fn(classifier(embeddings.unsqueeze(1)), labels.unsqueeze(1))

    return classifier, loss


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class MethodRun:
    """One method's model copy, head, optimiser and timings; :meth:`step` runs and times one training step."""

    def __init__(self, method: str, classes: int, initial_embedder: torch.nn.Module, args):
        self.embedder = copy.deepcopy(initial_embedder)
        self.classifier, self.loss_fn = build_head(method, classes, args.device)
        params = list(self.embedder.parameters()) + list(self.classifier.parameters())
        self.optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
        self.device, self.bf16 = args.device, args.bf16
        self.step_times, self.head_times, self.losses = [], [], []

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)

    def step(self, wavs: torch.Tensor, labels: torch.Tensor, timed: bool) -> None:
        """A whole step; then, apart, forward + backward of the head alone on the step's (detached) embeddings."""
        rel_lens = torch.ones(wavs.shape[0], device=self.device)
        _sync(self.device)
        start = time.perf_counter()
        with self._autocast():
            embeddings = self.embedder(wavs, rel_lens)
            loss = self.loss_fn(embeddings, labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        middle = time.perf_counter()
        head_input = embeddings.detach().requires_grad_(True)
        with self._autocast():
            head_loss = self.loss_fn(head_input, labels)
        head_loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        if timed:
            self.step_times.append(middle - start)
            self.head_times.append(time.perf_counter() - middle)
        self.losses.append(float(loss.detach()))

    def summary(self, batch: int) -> dict:
        median = statistics.median(self.step_times)
        return {
            "samples_per_second": round(batch / median, 2),
            "ms_median": round(1e3 * median, 1),
            "samples_per_second_best": round(batch / min(self.step_times), 2),
            "ms_all": [round(1e3 * t, 1) for t in self.step_times],
            "head_fwd_bwd_ms_median": round(1e3 * statistics.median(self.head_times), 2),
            "loss_first_last": [round(self.losses[0], 4), round(self.losses[-1], 4)],
            "finite": all(map(math.isfinite, self.losses)),
        }


def time_methods(methods: list[str], classes: int, initial_embedder: torch.nn.Module, wavs, labels, args) -> dict:
    """Steps of all methods interleaved (the first method rotates each round), so load changes hit them alike."""
    runs = {method: MethodRun(method, classes, initial_embedder, args) for method in methods}
    for round_number in range(args.warmup + args.steps):
        shift = round_number % len(methods)
        for method in methods[shift:] + methods[:shift]:
            runs[method].step(wavs, labels, timed=round_number >= args.warmup)
    summaries = {method: run.summary(wavs.shape[0]) for method, run in runs.items()}
    if "aam" in runs:
        for method, run in runs.items():
            summaries[method]["paired_ratio_to_aam"] = paired_ratios(runs["aam"].step_times, run.step_times)
    return summaries


def paired_ratios(aam_times: list[float], method_times: list[float]) -> dict:
    """AAM's step time over the method's, round by round (each round ran both back to back under the same load).

    The spread of these ratios is the run's own uncertainty; ``rounds_faster`` counts rounds where the
    method's step was the quicker one, and ``sign_test_p`` is the two-sided sign-test p-value of that count
    (tied rounds left out).
    """
    ratios = [aam / own for aam, own in zip(aam_times, method_times)]
    faster = sum(r > 1.0 for r in ratios)
    untied = faster + sum(r < 1.0 for r in ratios)
    tail = sum(math.comb(untied, k) for k in range(min(faster, untied - faster) + 1)) / 2**untied
    return {
        "median": round(statistics.median(ratios), 3),
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
        "rounds_faster": faster,
        "rounds": len(ratios),
        "sign_test_p": round(min(1.0, 2 * tail), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[5994, 17982])
    parser.add_argument("--channels", type=int, nargs="+", default=[512])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--crop", type=float, default=2.0, help="seconds of audio per sample")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast around forward and loss")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dense_max_classes", type=int, default=200_000, help="skip dense losses above this")
    parser.add_argument(
        "--aam_max_classes",
        type=int,
        default=1_000_000,
        help="but keep dense AAM, the reference of the ratios, up to this",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    generator = torch.Generator().manual_seed(0)
    wavs = (0.1 * torch.randn(args.batch, int(args.crop * 16000), generator=generator)).to(args.device)
    results = []
    for channels in args.channels:
        initial = build_embedder(channels, args.device)
        for classes in args.classes:
            labels = torch.randint(0, classes, (args.batch,), generator=generator).to(args.device)
            dense_skipped = [
                m
                for m in args.methods
                if m in DENSE
                and classes > args.dense_max_classes
                and not (m == "aam" and classes <= args.aam_max_classes)
            ]
            entry = {
                "classes": classes,
                "channels": channels,
                "methods": time_methods(
                    [m for m in args.methods if m not in dense_skipped], classes, initial, wavs, labels, args
                ),
                "skipped": {m: f"dense above --dense_max_classes {args.dense_max_classes}" for m in dense_skipped},
            }
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            aam = entry["methods"].get("aam")
            for result in entry["methods"].values():
                for key in ("", "_best"):
                    result[f"ratio_to_aam{key}"] = (
                        round(result[f"samples_per_second{key}"] / aam[f"samples_per_second{key}"], 3) if aam else None
                    )
            results.append(entry)
            print(json.dumps(entry), file=sys.stderr)
    print(
        json.dumps(
            {
                "what": "samples/s of a whole training step: Fbank + ECAPA-TDNN fwd/bwd + classifier/loss + SGD step",
                "batch": args.batch,
                "crop_seconds": args.crop,
                "steps": args.steps,
                "warmup": args.warmup,
                "device": args.device,
                "bf16_autocast": args.bf16,
                "threads": args.threads,
                "settings": "AAM s32 m0.2, CosFace s32 m0.2, Q-Margin s7.5 m0.2 alpha 1.5/1.75, "
                "sparse head alpha 1.75 s7.5 m0.2; "
                "SGD momentum 0.9 nesterov wd 1e-4",
                "ratio_to_aam": "samples/s of the method / samples/s of AAM, same run, steps interleaved "
                "(> 1 is faster); "
                "from median step times, and from the fastest step (_best: least disturbed by load)",
                "paired_ratio_to_aam": "AAM step time / method step time within each round "
                "(median, min, max over rounds), "
                "rounds where the method was faster, and the two-sided sign-test p-value",
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
                "cpus": os.cpu_count(),
                "note": "shared machine: other engineers' jobs run at the same time (see load average)",
                "torch": torch.__version__,
                "machine": platform.machine(),
                "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
