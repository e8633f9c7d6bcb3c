"""``bench/train_step.py``: its paired per-round ratios against scipy's sign test, and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.stats import binomtest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "train_step.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "aam, own",
    [
        ([5.0, 5.1, 4.9, 5.2, 5.0, 5.3, 4.8, 5.0], [4.6, 4.2, 4.7, 4.8, 4.8, 4.5, 4.4, 4.9]),
        ([1.0, 2.0, 3.0, 4.0, 5.0], [1.5, 1.0, 3.5, 4.5, 4.0]),
        ([2.0, 2.0, 2.0], [2.0, 1.0, 3.0]),  # one tied round, left out of the test
    ],
)
def test_paired_ratios_match_scipy_sign_test(aam, own):
    result = load_bench().paired_ratios(aam, own)
    ratios = sorted(a / o for a, o in zip(aam, own))
    faster = sum(r > 1 for r in ratios)
    untied = sum(r != 1 for r in ratios)
    assert result["rounds_faster"] == faster and result["rounds"] == len(aam)
    assert result["min"] == pytest.approx(ratios[0], abs=1e-3) and result["max"] == pytest.approx(ratios[-1], abs=1e-3)
    assert result["sign_test_p"] == pytest.approx(binomtest(faster, untied, 0.5).pvalue, abs=1e-4)


@pytest.mark.e2e
def test_tiny_run_reports_every_method_against_aam():
    completed = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--classes",
            "50",
            "--channels",
            "16",
            "--batch",
            "2",
            "--crop",
            "0.5",
            "--steps",
            "2",
            "--warmup",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(completed.stdout)
    methods = report["results"][0]["methods"]
    assert set(methods) == {"aam", "cosface", "qmargin_a1.5", "qmargin_a1.75", "sparse"}
    assert methods["aam"]["paired_ratio_to_aam"]["median"] == 1.0
    for result in methods.values():
        assert result["finite"] and len(result["ms_all"]) == 2
        assert result["paired_ratio_to_aam"]["rounds"] == 2
