"""Benchmark: speaker-bootstrap intervals and a paired comparison at Vox1-O and Vox1-E size; prints JSON.

Synthetic VoxCeleb-like lists: Vox1-O size (37,611 trials, 40 speakers, 4,708 utterances)
and Vox1-E size (579,818 trials, 1,251 speakers, 145,160 utterances), half target trials,
scores with a per-speaker effect. Times ``bootstrap_metrics`` (1,000 resamples, default
P_targets and FARs) and ``paired_comparison`` (two systems, the same 1,000 resamples).
The machine's load average is printed with the timings: on a shared machine they are upper
bounds. Run: ``.venv/bin/python bench/bootstrap.py [--sizes O E] [--n_resamples 1000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from qmargin_spk.metrics import bootstrap_metrics, paired_comparison

SIZES = {
    "O": {"n_trials": 37_611, "n_speakers": 40, "n_utterances": 4_708},
    "E": {"n_trials": 579_818, "n_speakers": 1_251, "n_utterances": 145_160},
}


def synthetic_list(n_trials: int, n_speakers: int, n_utterances: int, seed: int):
    """Trials with VoxCeleb ids: half target; score = speaker effects + noise (EER around 2 %)."""
    rng = np.random.default_rng(seed)
    utt_speaker = rng.integers(0, n_speakers, n_utterances)
    utt_speaker[:n_speakers] = np.arange(n_speakers)  # every speaker has an utterance
    ids = np.array([f"id{s:05d}/vid{i % 7}/{i:05d}.wav" for i, s in enumerate(utt_speaker)])
    by_speaker = [np.flatnonzero(utt_speaker == s) for s in range(n_speakers)]
    enrol = rng.integers(0, n_utterances, n_trials)
    labels = rng.random(n_trials) < 0.5
    test = np.empty(n_trials, dtype=np.int64)
    for i in range(n_trials):
        speaker = utt_speaker[enrol[i]]
        if labels[i]:
            test[i] = rng.choice(by_speaker[speaker])
        else:
            other = (speaker + rng.integers(1, n_speakers)) % n_speakers
            test[i] = rng.choice(by_speaker[other])
    target_effect = rng.normal(0, 0.05, n_speakers)
    nontarget_effect = rng.normal(0, 0.03, n_speakers)
    es, ts = utt_speaker[enrol], utt_speaker[test]
    mean = np.where(labels, 0.55 + target_effect[es], 0.05 + nontarget_effect[es] + nontarget_effect[ts])
    scores = mean + rng.normal(0, 0.1, n_trials)
    return scores, labels.astype(np.int8), ids[enrol].tolist(), ids[test].tolist()


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--n_resamples", type=int, default=1000)
    args = parser.parse_args()
    report: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_1_5_15_min_before": os.getloadavg(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "n_resamples": args.n_resamples,
        "results": {},
    }
    for name in args.sizes:
        size = SIZES[name]
        scores, labels, enrol, test = synthetic_list(**size, seed=0)
        noisy = scores + np.random.default_rng(1).normal(0, 0.02, scores.size)
        single_s, single = timed(lambda: bootstrap_metrics(scores, labels, enrol, test, n_resamples=args.n_resamples))
        paired_s, paired = timed(
            lambda: paired_comparison(scores, noisy, labels, enrol, test, n_resamples=args.n_resamples)
        )
        eer = single.eer
        report["results"][f"Vox1-{name}"] = {
            **size,
            "bootstrap_metrics_s": round(single_s, 2),
            "paired_comparison_s": round(paired_s, 2),
            "eer_percent": [round(100 * eer.value, 3), round(100 * eer.low, 3), round(100 * eer.high, 3)],
            "paired_b_is_a_plus_noise_eer_difference_percent": [
                round(100 * paired.eer.difference, 3),
                round(100 * paired.eer.low, 3),
                round(100 * paired.eer.high, 3),
            ],
            "paired_eer_p_value": paired.eer.p_value,
            "load_average_1_min_after": os.getloadavg()[0],
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
