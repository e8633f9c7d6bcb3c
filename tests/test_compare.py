"""Comparing experiments from hand-made stage-3 folders: tables, baseline differences, clear errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from qmargin_spk.cli import main as cli_main
from qmargin_spk.metrics import SpeakerBootstrap, compute_metrics, det_available
from qmargin_spk.scoring import CompareError, compare_experiments, write_score_file
from qmargin_spk.scoring.compare_tables import format_settings
from qmargin_spk.scoring.scored_system import system_identity

REPO = Path(__file__).resolve().parents[1]
N_RESAMPLES = 200
# Hand-made list labels, as a recipe supplies them (the library knows no corpus).
LABELS, ORDER = {"veri_test2": "Vox1-O"}, ("Vox1-O",)
# The description the experiment itself writes into its results file (current layout).
DESCRIBED = {
    "name": "qmargin",
    "label": "qmargin_sparse",
    "backbone": "ecapa_tdnn",
    "setting": "demo_cpu",
    "loss": "qmargin",
    "loss_settings": {"head": "sparse", "alpha": 1.5, "scale": 10.0, "margin": 0.2, "margin_ramp": [0, 0]},
    "finetuned_from": None,
}


def trial_list(seed, n_speakers=12, utts=4, nontargets=300):
    """VoxCeleb-style ids; all within-speaker pairs as targets plus random cross-speaker pairs."""
    rng = np.random.default_rng(seed)
    ids = [[f"id{s:05d}/vid/{u:05d}.wav" for u in range(utts)] for s in range(n_speakers)]
    enrol, test, labels = [], [], []
    for s in range(n_speakers):
        for i in range(utts):
            for j in range(i + 1, utts):
                enrol.append(ids[s][i]), test.append(ids[s][j]), labels.append(1)
    for _ in range(nontargets):
        s, t = rng.choice(n_speakers, 2, replace=False)
        enrol.append(ids[s][rng.integers(utts)]), test.append(ids[t][rng.integers(utts)]), labels.append(0)
    return enrol, test, np.array(labels, dtype=np.int8)


def make_experiment(root, folder, lists, experiment=None, backend="cosine"):
    """A stage-3 experiment folder: ``lists`` maps list name -> (enrol, test, labels, scores)."""
    scores_dir = root / folder / "scores"
    results = []
    for name, (enrol, test, labels, scores) in lists.items():
        score_file = scores_dir / f"{name}.{backend}.scores"
        write_score_file(score_file, enrol, test, scores, labels)
        results.append(
            {
                "list": name,
                "trial_file": f"/data/{name}.txt",
                "backend": backend,
                "n_trials": len(labels),
                "metrics": compute_metrics(scores, labels).to_dict(),
                "score_file": str(score_file),
                "det_plot": None,
            }
        )
    run = {
        "model_id": f"model-{folder}",
        "backend": backend,
        "test_root": "/data/wav",
        "n_utterances": 0,
        "settings": {},
        "results": results,
    }
    run["experiment"] = experiment
    (scores_dir / f"results.{backend}.json").write_text(json.dumps(run))
    return root / folder


@pytest.fixture
def two_systems(tmp_path):
    """Vox1-O-named and a custom list; system 'good' separates better than 'weak'."""
    rng = np.random.default_rng(0)
    lists_good, lists_weak = {}, {}
    for name, seed in (("veri_test2", 1), ("mylist", 2)):
        enrol, test, labels = trial_list(seed)
        signal = 2.0 * labels + rng.normal(size=labels.size)
        lists_good[name] = (enrol, test, labels, signal + 1.0 * labels)
        lists_weak[name] = (enrol, test, labels, signal + rng.normal(size=labels.size))
    described = {
        "name": "qmargin",
        "folder": "exp/qmargin",
        "hparams_file": "hparams/demo_cpu_qmargin.yaml",
        "loss": "qmargin",
        "alpha": 1.5,
        "scale": 30.0,
        "margin": 0.2,
        "margin_ramp": [None, None],
    }
    good = make_experiment(tmp_path, "exp_good", lists_good, described)
    weak = make_experiment(tmp_path, "exp_weak", lists_weak)  # "experiment": None, as when stage 3 had none
    return good, weak, lists_good, lists_weak


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", REPO / "recipes" / "voxceleb" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tables_hold_point_estimates_and_intervals(two_systems, tmp_path):
    good, weak, lists_good, lists_weak = two_systems
    out = tmp_path / "cmp"
    summary = compare_experiments([good, weak], out, n_resamples=N_RESAMPLES, list_labels=LABELS, list_order=ORDER)
    assert [e["name"] for e in summary["experiments"]] == ["qmargin", "exp_weak"]
    assert [entry["label"] for entry in summary["lists"]] == ["Vox1-O", "mylist"]  # ordered labels first

    enrol, test, labels, scores = lists_good["veri_test2"]
    expected = compute_metrics(scores, labels)
    entry = summary["lists"][0]
    result = entry["systems"]["qmargin"]
    assert result["eer"]["value"] == expected.eer
    reference = SpeakerBootstrap(labels, enrol, test, n_resamples=N_RESAMPLES).intervals(
        SpeakerBootstrap(labels, enrol, test, n_resamples=N_RESAMPLES).replicates(scores)
    )
    assert result["eer"]["low"] == reference.eer.low and result["eer"]["high"] == reference.eer.high
    assert entry["n_speakers"] == 12 and entry["n_trials"] == labels.size

    cell = f"{100 * expected.eer:.2f} [{100 * reference.eer.low:.2f}, {100 * reference.eer.high:.2f}]"
    wide = (out / "summary.md").read_text()
    assert wide == summary["table"]
    assert "| experiment | loss | loss settings | Vox1-O EER % | Vox1-O minDCF@0.01 |" in wide
    assert f"| qmargin | qmargin | alpha 1.5, scale 30, margin 0.2 | {cell} |" in wide  # older layout, no ramp
    assert "| exp_weak |  |  |" in wide  # folder name and blanks where the results JSON has no experiment entry
    assert "Differences" not in wide  # no baseline
    per_list = (out / "veri_test2.md").read_text()
    assert cell in per_list and "TAR@FAR=0.0001 %" in per_list
    assert "n/a" in per_list  # 300 non-targets: TAR at FAR 1e-3 and below is not reported
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["lists"][1]["systems"]["exp_weak"] == summary["lists"][1]["systems"]["exp_weak"]
    if det_available():
        assert (out / "veri_test2.det.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*.tmp"))


def test_baseline_differences_are_paired(two_systems, tmp_path):
    good, weak, lists_good, lists_weak = two_systems
    out = tmp_path / "cmp"
    summary = compare_experiments(
        [good], out, baseline=weak, n_resamples=N_RESAMPLES, list_labels=LABELS, list_order=ORDER
    )  # baseline added
    assert summary["baseline"] == "exp_weak"
    assert [e["name"] for e in summary["experiments"]] == ["exp_weak", "qmargin"]
    enrol, test, labels, scores_good = lists_good["veri_test2"]
    scores_weak = lists_weak["veri_test2"][3]
    bootstrap = SpeakerBootstrap(labels, enrol, test, n_resamples=N_RESAMPLES)
    expected = bootstrap.compare(bootstrap.replicates(scores_weak), bootstrap.replicates(scores_good))
    difference = summary["lists"][0]["differences"]["qmargin"]
    assert difference["eer"] == expected.eer.to_dict()
    assert difference["eer"]["difference"] < 0 and difference["eer"]["p_value"] < 0.05  # good is better
    assert "exp_weak" not in summary["lists"][0]["differences"]

    wide = (out / "summary.md").read_text()
    e = expected.eer
    cell = f"{100 * e.difference:+.2f} [{100 * e.low:+.2f}, {100 * e.high:+.2f}] p={e.p_value:.3f}"
    assert f"| qmargin | {cell} |" in wide
    assert cell in (out / "veri_test2.md").read_text()


def test_mismatched_trials_are_refused(two_systems, tmp_path):
    good, _, lists_good, _ = two_systems
    enrol, test, labels, scores = lists_good["veri_test2"]
    swapped = list(test)
    swapped[5], swapped[6] = swapped[6], swapped[5]
    other = make_experiment(tmp_path, "exp_other", {"veri_test2": (enrol, swapped, labels, scores)})
    with pytest.raises(CompareError, match=r"list 'veri_test2': trial 6 differs .* same trial list"):
        compare_experiments([good, other], tmp_path / "cmp", baseline=good, n_resamples=N_RESAMPLES)
    shorter = make_experiment(tmp_path, "exp_short", {"veri_test2": (enrol[:-1], test[:-1], labels[:-1], scores[:-1])})
    with pytest.raises(CompareError, match=f"qmargin has {labels.size} trials but exp_short has {labels.size - 1}"):
        compare_experiments([good, shorter], tmp_path / "cmp", n_resamples=N_RESAMPLES)


def test_missing_inputs_give_one_line_errors(two_systems, tmp_path):
    good, weak, _, _ = two_systems
    with pytest.raises(CompareError, match="no such experiment folder"):
        compare_experiments([good, tmp_path / "nope"], tmp_path / "cmp")
    with pytest.raises(CompareError, match="no asnorm results"):
        compare_experiments([good], tmp_path / "cmp", backend="asnorm")
    (weak / "scores" / "mylist.cosine.scores").unlink()
    with pytest.raises(CompareError, match="score file of list 'mylist' is missing"):
        compare_experiments([good, weak], tmp_path / "cmp")
    (good / "scores" / "mylist.cosine.scores").write_text("a b 0.5 1\nbroken line\n")
    with pytest.raises(CompareError, match=r"mylist.cosine.scores:2: expected"):
        compare_experiments([good], tmp_path / "cmp")


def test_lists_keep_their_names_without_labels(two_systems, tmp_path):
    good, weak, _, _ = two_systems
    summary = compare_experiments([weak, good], tmp_path / "cmp", n_resamples=N_RESAMPLES)
    assert [(entry["list"], entry["label"]) for entry in summary["lists"]] == [
        ("mylist", "mylist"),
        ("veri_test2", "veri_test2"),
    ]  # sorted by name
    assert "| mylist EER % |" in summary["table"] and "Vox1" not in summary["table"]


def test_systems_are_labelled_by_their_own_description(two_systems, tmp_path):
    good, weak, lists_good, _ = two_systems
    sparse = make_experiment(tmp_path, "exp_sparse", {"mylist": lists_good["mylist"]}, DESCRIBED)
    summary = compare_experiments([sparse, good, weak], tmp_path / "cmp", n_resamples=N_RESAMPLES)
    described = summary["experiments"][0]
    assert described["name"] == "qmargin_sparse" and described["loss"] == "qmargin"
    assert described["loss_settings"] == DESCRIBED["loss_settings"] and described["description"] == DESCRIBED
    assert summary["experiments"][1]["loss_settings"] == {
        "alpha": 1.5,
        "scale": 30.0,
        "margin": 0.2,
        "margin_ramp": [None, None],
    }  # older layout: top-level keys
    wide = summary["table"]
    assert "| qmargin_sparse | qmargin | head sparse, alpha 1.5, scale 10, margin 0.2, margin_ramp [0, 0] |" in wide
    row = next(line for line in wide.splitlines() if line.startswith("| qmargin_sparse |"))
    assert row.endswith("| — | — | — | — |")  # not scored on veri_test2
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["experiments"][0]["description"]["backbone"] == "ecapa_tdnn"


def test_two_systems_with_one_label_are_told_apart_by_path(two_systems, tmp_path):
    _, _, lists_good, lists_weak = two_systems
    first = make_experiment(tmp_path, "run1", lists_good, DESCRIBED)
    second = make_experiment(tmp_path, "run2", lists_weak, DESCRIBED)
    summary = compare_experiments([first, second], tmp_path / "cmp", baseline=first, n_resamples=N_RESAMPLES)
    assert [e["name"] for e in summary["experiments"]] == [str(first), str(second)]
    assert summary["baseline"] == str(first) and list(summary["lists"][0]["differences"]) == [str(second)]


def test_identity_of_either_description_layout():
    assert system_identity(DESCRIBED, "folder") == ("qmargin_sparse", "qmargin", DESCRIBED["loss_settings"])
    older = {
        "name": "aam",
        "folder": "exp/aam",
        "hparams_file": "h.yaml",
        "loss": "aam",
        "alpha": None,
        "scale": 30.0,
        "margin": 0.2,
        "margin_ramp": [1, 4],
        "finetuned_from": None,
    }
    assert system_identity(older, "folder") == (
        "aam",
        "aam",
        {"alpha": None, "scale": 30.0, "margin": 0.2, "margin_ramp": [1, 4]},
    )
    assert system_identity(None, "folder") == ("folder", None, {})
    assert system_identity({"loss": "aam"}, "folder") == ("folder", "aam", {})
    with pytest.raises(ValueError, match="'loss_settings' must be a mapping"):
        system_identity({"loss_settings": [1.5]}, "folder")
    assert format_settings({"alpha": None, "scale": 30.0, "margin": 0.2, "margin_ramp": [1, 4]}) == (
        "scale 30, margin 0.2, margin_ramp [1, 4]"
    )
    assert format_settings({"margin_ramp": [None, None], "head": "sparse", "norm": True}) == "head sparse, norm true"


def test_malformed_description_is_a_one_line_error(two_systems, tmp_path):
    _, _, lists_good, _ = two_systems
    broken = make_experiment(tmp_path, "exp_broken", lists_good, {"loss": "qmargin", "loss_settings": "alpha=1.5"})
    with pytest.raises(CompareError, match=r"results.cosine.json: not a stage-3 results file \('loss_settings'"):
        compare_experiments([broken], tmp_path / "cmp")


def test_compare_command_prints_the_summary_with_list_names(two_systems, tmp_path, capsys):
    good, weak, _, _ = two_systems
    out = tmp_path / "cmp"
    argv = [
        "compare",
        str(good),
        str(weak),
        "--baseline",
        str(weak),
        "--out",
        str(out),
        "--n_resamples",
        "50",
        "--seed",
        "3",
        "--confidence",
        "0.9",
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    summary = (out / "summary.md").read_text()
    assert printed.startswith(summary) and "written to" in printed
    assert "| veri_test2 EER % |" in summary and "Vox1-O" not in summary  # the CLI knows no corpus
    assert "90 % percentile intervals from a 50-resample speaker bootstrap (seed 3)" in summary
    assert "Differences to the baseline exp_weak" in summary
    saved = json.loads((out / "comparison.json").read_text())
    enrol, test, labels, scores = two_systems[2]["veri_test2"]
    bootstrap = SpeakerBootstrap(labels, enrol, test, n_resamples=50, seed=3)
    assert (
        saved["lists"][1]["systems"]["qmargin"]["eer"]
        == bootstrap.intervals(bootstrap.replicates(scores), 0.9).eer.to_dict()
    )


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda good, tmp: [str(good), str(tmp / "missing")], "missing: no such experiment folder"),
        (lambda good, tmp: [str(good), "--n_resamples", "1"], "n_resamples must be at least 2, got 1"),
        (lambda good, tmp: [str(good), "--backend", "asnorm"], "no asnorm results"),
    ],
)
def test_compare_command_mistakes_end_with_one_line(two_systems, tmp_path, capsys, make_argv, message):
    good = two_systems[0]
    assert cli_main(["compare", *make_argv(good, tmp_path), "--out", str(tmp_path / "cmp")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("qmargin-spk: error: ") and message in error


def test_recipe_script_names_the_voxceleb_lists_and_exits_with_one_line(two_systems, tmp_path, capsys):
    good, weak, _, _ = two_systems
    script = load_recipe("compare")

    assert script.main([str(good), str(tmp_path / "missing"), "--out", str(tmp_path / "cmp")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "missing: no such experiment folder" in error

    argv = [str(good), str(weak), "--baseline", str(weak), "--out", str(tmp_path / "cmp"), "--n_resamples", "50"]
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| qmargin |" in printed and "Differences to the baseline exp_weak" in printed
    assert "| Vox1-O EER % |" in printed and printed.index("Vox1-O EER") < printed.index("mylist EER")
    assert (tmp_path / "cmp" / "mylist.md").is_file()
    assert (tmp_path / "cmp" / "veri_test2.md").read_text().startswith("## Vox1-O (veri_test2: ")


def test_demo_verdict_says_whether_the_difference_is_significant():
    demo = load_recipe("demo")
    entry = {
        "label": "Vox1-O",
        "differences": {
            "qmargin": {"eer": {"difference": -0.012, "low": -0.02, "high": -0.004, "p_value": 0.004}},
            "entmax": {"eer": {"difference": 0.003, "low": -0.006, "high": 0.011, "p_value": 0.41}},
        },
    }
    text = demo.verdict({"lists": [entry]}, "aam")
    assert "qmargin - aam EER -1.20 points [-2.00, -0.40], p = 0.004: a significant difference" in text
    assert "entmax - aam EER +0.30 points [-0.60, +1.10], p = 0.410: no significant difference" in text
