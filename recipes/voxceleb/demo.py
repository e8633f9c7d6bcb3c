#!/usr/bin/env python3
"""The embedded demo: synthesise a small corpus, run the whole recipe for Q-Margin and AAM, compare.

    python recipes/voxceleb/demo.py [--out exp/demo] [--losses qmargin aam] [--backbone ecapa_tdnn]
        [--setting demo_cpu] [--corpus_seed 0] [--seeds S1 S2 ... [--jobs N]] [--key=value ...]

Each name of ``--losses`` is a loss fragment (hparams/losses/), optionally with a head
(``qmargin_sparse``, ``qmargin_sharded``); every run composes it with the same backbone and
setting, so only the loss differs. Extra ``--key=value`` arguments go to every run (hparams
overrides, e.g. ``--number_of_epochs=4``).

With ``--seeds`` the losses are trained once per training seed, as a study (``qmargin-spk study``,
docs/studies.md: the spec is written to ``OUT/study.yaml``, the runs go to ``OUT/study/runs``), on the
``study`` corpus preset (200 test speakers) unless ``--preset`` says otherwise, and the verdict is pooled
over the seeds and the test speakers. Without it, one run per loss with the experiment's own seed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ruamel.yaml

from qmargin_spk.data.synthetic import PRESETS, CorpusPaths, generate_corpus
from qmargin_spk.losses import HEADS
from qmargin_spk.scoring.compare import compare_experiments
from qmargin_spk.utils import atomic_write_text

REPO = Path(__file__).resolve().parents[2]
BASE_EXPERIMENT = REPO / "hparams" / "demo_cpu_qmargin.yaml"  # its backbone and setting, the loss replaced per run


def loss_flags(name: str) -> list[str]:
    """run.sh flags for a demo loss name: a loss fragment, or ``<loss>_<head>`` for another head."""
    fragments = REPO / "hparams" / "losses"
    if (fragments / f"{name}.yaml").is_file():
        return ["--loss", name]
    loss, _, head = name.rpartition("_")
    if (fragments / f"{loss}.yaml").is_file() and head in HEADS:
        return ["--loss", loss, f"--head={head}"]
    known = sorted(p.stem for p in fragments.glob("*.yaml"))
    raise SystemExit(
        f"demo.py: error: no loss {name!r}: a loss fragment ({', '.join(known)}) "
        f"or <loss>_<head> with a head of {sorted(HEADS)}"
    )


def ensure_corpus(root: Path, seed: int, preset: str = "demo") -> CorpusPaths:
    """The demo corpus under ``root``: generated once, reused when it already matches (generate_corpus decides)."""
    start = time.time()
    paths = generate_corpus(root, seed=seed, **PRESETS[preset])
    print(f"corpus: {root} ready in {time.time() - start:.0f} s")
    return paths


def run_loss(loss: str, corpus: CorpusPaths, exp: Path, fragments: list[str], overrides: list[str]) -> float:
    """Run all stages of the recipe for the loss name ``loss`` on the demo experiment; returns the wall time."""
    command = [
        "bash",
        str(REPO / "recipes" / "voxceleb" / "run.sh"),
        "--train_root",
        str(corpus.train_root),
        "--test_root",
        str(corpus.test_root),
        "--trials",
        str(corpus.trials),
        "--exp",
        str(exp),
        "--hparams",
        str(BASE_EXPERIMENT),
        *fragments,
        *loss_flags(loss),
        *overrides,
    ]
    start = time.time()
    subprocess.run(command, check=True, env={**os.environ, "PYTHON": sys.executable})
    return time.time() - start


def verdict(summary: dict, baseline: str) -> str:
    """One plain sentence per system and list: does its EER differ from the baseline's at the 5 % level?"""
    lines = []
    for entry in summary["lists"]:
        for name, difference in entry["differences"].items():
            eer = difference["eer"]
            low, high, p_value = 100 * eer["low"], 100 * eer["high"], eer["p_value"]
            significant = p_value < 0.05
            lines.append(
                f"{entry['label']}: {name} - {baseline} EER {100 * eer['difference']:+.2f} points "
                f"[{low:+.2f}, {high:+.2f}], p = {p_value:.3f}: "
                + (
                    "a significant difference at the 5 % level."
                    if significant
                    else "no significant difference at the 5 % level (the interval covers zero)."
                )
            )
    return "\n".join(lines) + "\n"


def study_spec(corpus: CorpusPaths, losses: list[str], seeds: list[int], choices: dict, overrides: list[str]) -> dict:
    """The study of the seeded demo: one system per loss (the demo experiment with that loss), every seed."""
    common = {}
    for override in overrides:
        key, equals, value = override.removeprefix("--").partition("=")
        if not override.startswith("--") or not equals:
            raise SystemExit(f"demo.py: error: expected --key=value, got {override!r}")
        common[key] = ruamel.yaml.YAML(typ="safe").load(value)
    systems = {}
    for loss in losses:
        flags = loss_flags(loss)
        system = {"hparams": str(BASE_EXPERIMENT), **choices, "loss": flags[1]}
        if len(flags) > 2:  # --head=<head>
            system["overrides"] = {"head": flags[2].partition("=")[2]}
        systems[loss] = system
    return {
        "train_root": str(corpus.train_root),
        "test_root": str(corpus.test_root),
        "trials": {"test": str(corpus.trials)},
        "seeds": seeds,
        "baseline": "aam" if "aam" in losses else losses[0],
        "overrides": common,
        "systems": systems,
    }


def pooled_verdict(report: dict) -> str:
    """One sentence per system and list: its EER and TAR@FAR=1e-3 against the baseline, pooled over the seeds."""
    from qmargin_spk.studies.report import metric_kind

    lines = [f"{warning}." for warning in report["warnings"]]
    for entry in report["lists"]:
        for name, difference in entry["differences"].items():
            for metric, value in difference.items():
                kind, key = metric_kind(metric)
                if not (kind == "eer" or (kind == "tar_at_far" and key == "0.001")):
                    continue
                title = "EER" if kind == "eer" else "TAR@FAR=1e-3"
                if value.get("mean") is None:
                    lines.append(f"{entry['label']}: {name} - {report['baseline']} {title}: not defined on this list.")
                    continue
                low, high, p_value = 100 * value["low"], 100 * value["high"], value["p_value"]
                lines.append(
                    f"{entry['label']}: {name} - {report['baseline']} {title} {100 * value['mean']:+.2f} points "
                    f"[{low:+.2f}, {high:+.2f}] over {value['n_seeds']} seeds, p = {p_value:.3f}: "
                    + (
                        "a significant difference at the 5 % level."
                        if p_value < 0.05
                        else "no significant difference at the 5 % level (the interval covers zero)."
                    )
                )
    return "\n".join(lines) + "\n"


def run_seeded(args: argparse.Namespace, fragments: list[str], overrides: list[str]) -> None:
    """The losses over ``args.seeds`` as a study, with the verdict pooled over seeds and test speakers."""
    from qmargin_spk.studies import StudyError, run_and_report

    corpus = ensure_corpus(args.out / "corpus", args.corpus_seed, args.preset or "study")
    choices = dict(zip(fragments[::2], fragments[1::2]))
    spec = study_spec(corpus, args.losses, args.seeds, {k.removeprefix("--"): v for k, v in choices.items()}, overrides)
    spec_file = args.out / "study.yaml"
    atomic_write_text(spec_file, json.dumps(spec, indent=1) + "\n")  # JSON is YAML
    try:
        report = run_and_report(spec_file, args.out / "study", jobs=args.jobs)
    except StudyError as err:
        raise SystemExit(f"demo.py: error: {err}") from None
    text = (args.out / "study" / "report.md").read_text(encoding="utf-8")
    verdict_text = pooled_verdict(report)
    atomic_write_text(args.out / "study_verdict.md", verdict_text)
    backbone, setting = args.backbone or "ecapa_tdnn", args.setting or "demo_cpu"
    print(
        f"\n{text}\nDemo over seeds {args.seeds}: synthetic corpus, {backbone} ({setting}), cosine scoring, "
        "95 % intervals pooled over seeds and test speakers\n"
    )
    print(verdict_text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "exp" / "demo")
    parser.add_argument(
        "--losses",
        nargs="+",
        default=["qmargin", "aam"],
        help="loss fragments (hparams/losses/), or <loss>_<head> such as qmargin_sparse",
    )
    parser.add_argument("--backbone", help="backbone fragment of every run (default: the demo experiment's)")
    parser.add_argument("--setting", help="setting fragment of every run (default: demo_cpu)")
    parser.add_argument(
        "--corpus_seed",
        "--seed",
        dest="corpus_seed",
        type=int,
        default=0,
        help="seed of the synthetic corpus (not of training: that is the hparams' seed)",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="synthetic corpus size (demo; study with --seeds)")
    parser.add_argument(
        "--seeds", nargs="+", type=int, help="training seeds: run every loss once per seed and pool them (a study)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="with --seeds: runs at once, threads split among them")
    args, overrides = parser.parse_known_args()
    fragments = [
        flag for kind in ("backbone", "setting") if getattr(args, kind) for flag in (f"--{kind}", getattr(args, kind))
    ]
    for loss in args.losses:
        loss_flags(loss)  # every name is checked before anything runs
    if args.seeds:
        run_seeded(args, fragments, overrides)
        return
    corpus = ensure_corpus(args.out / "corpus", args.corpus_seed, args.preset or "demo")
    for loss in args.losses:
        seconds = run_loss(loss, corpus, args.out / loss, fragments, overrides)
        print(f"{loss}: recipe {seconds:.0f} s")
    baseline = "aam" if "aam" in args.losses else args.losses[0]
    summary = compare_experiments(
        [args.out / loss for loss in args.losses], args.out / "comparison", baseline=args.out / baseline
    )
    text = summary["table"] + "\n" + verdict(summary, baseline)
    atomic_write_text(args.out / "comparison.md", text)
    backbone, setting = args.backbone or "ecapa_tdnn", args.setting or "demo_cpu"
    print(f"\nDemo: synthetic corpus, {backbone} ({setting}), cosine scoring, 95 % speaker-bootstrap intervals\n")
    print(text)


if __name__ == "__main__":
    main()
