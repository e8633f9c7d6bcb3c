#!/usr/bin/env python3
"""The embedded demo: synthesise a small corpus, run the whole recipe for Q-Margin and AAM, compare.

    python recipes/voxceleb/demo.py [--out exp/demo] [--losses qmargin aam] [--key=value ...]

Extra ``--key=value`` arguments go to every run (hparams overrides, e.g. ``--number_of_epochs=4``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from qmargin_spk.data.synthetic import PRESETS, CorpusPaths, generate_corpus
from qmargin_spk.utils import atomic_write_text

REPO = Path(__file__).resolve().parents[2]


def ensure_corpus(root: Path, seed: int, preset: str = "demo") -> CorpusPaths:
    """The demo corpus under ``root``: generated once, reused when it already matches (generate_corpus decides)."""
    start = time.time()
    paths = generate_corpus(root, seed=seed, **PRESETS[preset])
    print(f"corpus: {root} ready in {time.time() - start:.0f} s")
    return paths


def run_loss(loss: str, corpus: CorpusPaths, exp: Path, overrides: list[str]) -> float:
    """Run all stages of the recipe with ``hparams/demo_cpu_<loss>.yaml``; returns the wall time."""
    command = ["bash", str(REPO / "recipes" / "voxceleb" / "run.sh"), "--train_root", str(corpus.train_root),
               "--test_root", str(corpus.test_root), "--trials", str(corpus.trials), "--exp", str(exp),
               "--hparams", str(REPO / "hparams" / f"demo_cpu_{loss}.yaml"), *overrides]
    start = time.time()
    subprocess.run(command, check=True, env={**os.environ, "PYTHON": sys.executable})
    return time.time() - start


def comparison_table(rows: list[tuple[str, dict, float]]) -> str:
    lines = ["| loss | EER % | minDCF@0.01 | minDCF@0.05 | TAR@FAR=1e-2 % | recipe time (s) |",
             "|---|---|---|---|---|---|"]
    for loss, metrics, seconds in rows:
        tar = metrics["tar_at_far"].get("0.01")
        tar_text = "n/a" if tar is None or tar.get("tar") is None else f"{100 * tar['tar']:.2f}"
        lines.append(f"| {loss} | {100 * metrics['eer']:.2f} | {metrics['min_dcf']['0.01']['value']:.4f} | "
                     f"{metrics['min_dcf']['0.05']['value']:.4f} | {tar_text} | {seconds:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "exp" / "demo")
    parser.add_argument("--losses", nargs="+", default=["qmargin", "aam"])
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args()
    corpus = ensure_corpus(args.out / "corpus", args.seed)
    rows = []
    for loss in args.losses:
        seconds = run_loss(loss, corpus, args.out / loss, overrides)
        results = json.loads((args.out / loss / "scores" / "results.cosine.json").read_text())
        rows.append((loss, results["results"][0]["metrics"], seconds))
    table = comparison_table(rows)
    atomic_write_text(args.out / "comparison.md", table)
    print("\nDemo: synthetic corpus, ECAPA-TDNN (CPU setting), cosine scoring\n")
    print(table)


if __name__ == "__main__":
    main()
