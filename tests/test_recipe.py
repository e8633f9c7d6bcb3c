"""The VoxCeleb recipe on a tiny synthetic corpus: all stages, resume, DDP, composed experiments and the record."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from speechbrain.utils.checkpoints import average_checkpoints

from conftest import stage_script
from qmargin_spk.cli import main as cli_main
from qmargin_spk.data.dataset import SpeakerLabelEncoder
from qmargin_spk.data.manifest import read_manifest
from qmargin_spk.inference import SpeakerModel
from qmargin_spk.losses import AAMLoss, AlphaEntmaxLoss, CosFaceLoss, DenseHead, QMarginLoss, SparseQMarginHead
from qmargin_spk.stages.experiment import Experiment, last_checkpoints
from qmargin_spk.stages.train import finetune_stage, train_stage
from qmargin_spk.training.brain import SpeakerBrain

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "recipes" / "voxceleb" / "run.sh"
LOSSES = {
    "qmargin": QMarginLoss,
    "aam": AAMLoss,
    "cosface": CosFaceLoss,
    "entmax": AlphaEntmaxLoss,
    "qmargin_sparse": None,
    "qmargin_sharded": None,
}  # fused heads compute the loss themselves
SETTINGS = ("demo_cpu", "vox2_ecapa")
FAST = ["--number_of_epochs=1", "--warmup_epochs=1", "--batch_size=8", "--channels=32", "--embedding_dim=32"]
RUN_OPTS = {"device": "cpu", "noprogressbar": True}


def run_recipe(corpus, exp, *extra, hparams="hparams/demo_cpu_qmargin.yaml", trials=None, check=True):
    command = [
        "bash",
        str(RUN_SH),
        "--train_root",
        str(corpus.train_root),
        "--test_root",
        str(corpus.test_root),
        "--trials",
        str(trials or corpus.trials),
        "--exp",
        str(exp),
        *(["--hparams", hparams] if hparams else []),
        *FAST,
        *extra,
    ]
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if not check:
        return result
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("loss", LOSSES)
def test_each_experiment_file_builds_its_loss(prepared, setting, loss):
    hparams = Experiment.for_training(
        prepared, REPO / "hparams" / f"{setting}_{loss}.yaml", None, {"channels": 16, "num_workers": 0}
    ).hparams
    rows = read_manifest(prepared / "data" / "train.csv")
    train_data = hparams["train_data"](manifest=rows, labels=SpeakerLabelEncoder.from_rows(rows))
    head = hparams["classifier"](num_classes=train_data.num_classes, embedding_dim=hparams["embedding_dim"])
    assert isinstance(head, SparseQMarginHead) == (loss == "qmargin_sparse")
    if LOSSES[loss] is not None:
        assert isinstance(head, DenseHead) and type(head.loss) is LOSSES[loss]
    assert head.weight.shape == (train_data.num_classes, hparams["embedding_dim"])
    assert (head.scale, head.margin) == (hparams["scale"], hparams["margin"])
    alpha = head.alpha if hasattr(head, "alpha") else head.loss.alpha
    assert alpha == hparams.get("alpha", 1.0)  # AAM and CosFace: softmax, alpha 1
    assert hparams["loss_name"] == loss.split("_")[0] and hparams["head"] == head.kind
    # Loading the hparams (as the scoring stage does) creates no training files.
    assert not (prepared / "save" / "label_encoder.json").exists()


def test_all_stages_end_to_end(corpus, tmp_path, capsys):
    # Paths reach Python as data: odd characters round-trip and a tag in a file name runs nothing.
    exp = tmp_path / "exp a=b #c: d, 'q\" é"
    trials = tmp_path / "odd dir, x=1 #2" / "t, !apply:os.system [touch pwned]"
    trials.parent.mkdir()
    trials.write_text(Path(corpus.trials).read_text())
    # An AAM experiment file with the loss fragment swapped by the flag: Q-Margin is trained and labelled.
    swap = ("--loss", "qmargin")
    run_recipe(corpus, exp, *swap, trials=trials, hparams="hparams/demo_cpu_aam.yaml")
    assert not (REPO / "pwned").exists()
    assert "loss: qmargin" in (exp / "hyperparams.yaml").read_text()
    results = json.loads((exp / "scores" / "results.cosine.json").read_text())
    (entry,) = results["results"]
    assert entry["trial_file"] == str(trials) and entry["list"] == trials.stem
    assert results["experiment"]["loss"] == "qmargin" and results["experiment"]["name"] == exp.name
    assert 0.0 <= entry["metrics"]["eer"] <= 1.0
    eer = entry["intervals"]["eer"]  # speaker-bootstrap interval around the point estimate
    assert eer["value"] == entry["metrics"]["eer"] and eer["low"] <= eer["value"] <= eer["high"]
    n_trials = len(Path(corpus.trials).read_text().splitlines())
    assert entry["n_trials"] == n_trials
    score_lines = Path(entry["score_file"]).read_text().splitlines()
    assert len(score_lines) == n_trials
    assert (exp / "scores" / "results.cosine.md").is_file()
    # Stage 4: the packaged model embeds like stage 3 and names its loss and results.
    info = json.loads((exp / "model" / "model.json").read_text())
    assert info["loss"] == "qmargin" and info["loss_settings"]["margin"] == 0.2 and info["n_training_speakers"] == 8
    assert info["results"][0]["metrics"]["eer"] == entry["metrics"]["eer"]
    cache = torch.load(exp / "scores" / "embeddings" / "test.pt", weights_only=True)
    model = SpeakerModel.from_folder(exp / "model")
    utt = cache["utt_ids"][0]
    stage3 = torch.nn.functional.normalize(cache["vectors"][0], dim=0).numpy()
    assert float(model.embed([Path(corpus.test_root) / "wav" / utt])[0] @ stage3) > 0.99999
    # A calibration in the model folder makes stage 3 report calibrated results too.
    assert cli_main(["calibrate", "--model", str(exp / "model"), "--scores", entry["score_file"]]) == 0
    # Re-running a finished recipe: prepare is skipped, training has nothing left, scoring reuses embeddings.
    checkpoints = sorted(p.name for p in (exp / "save").glob("CKPT+*"))
    output = run_recipe(corpus, exp, *swap, trials=trials, hparams="hparams/demo_cpu_aam.yaml")
    assert "nothing to do" in output
    assert sorted(p.name for p in (exp / "save").glob("CKPT+*")) == checkpoints
    calibrated = json.loads((exp / "scores" / "results.cosine.calibrated.json").read_text())
    assert (
        calibrated["results"][0]["metrics"]["cllr"] <= 1.0 + 1e-9
    )  # calibrated LLRs are no worse than "no information"
    assert (exp / "model" / "calibration.json").is_file()  # repackaging kept the calibration of the same weights
    # Later stages hold to the record: a flag or an override describing another model is one line naming both values.
    score = stage_script("score")
    where = ["--exp", str(exp), "--test_root", str(corpus.test_root), "--trials", str(trials)]
    capsys.readouterr()
    for extra, named in (
        (["--loss", "aam"], "loss_name: 'qmargin' in the record, 'aam'"),
        (["--channels=64"], "channels: 32 in the record, 64"),
    ):
        assert score(["hparams/demo_cpu_qmargin.yaml", *where, *FAST, *extra]) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("score.py: error:") and named in line
    # Scoring keys may change at stage 3, and the record alone is enough (no experiment file).
    assert score([*where, "--bootstrap_resamples=0"]) == 0
    assert json.loads((exp / "scores" / "results.cosine.json").read_text())["results"][0]["intervals"] is None


def test_fused_sparse_head_trains_through_the_recipe(prepared):
    overrides = {
        "output_folder": str(prepared),
        "number_of_epochs": 2,
        "warmup_epochs": 1,
        "batch_size": 8,
        "channels": 32,
        "embedding_dim": 32,
        "num_workers": 0,
    }
    brain = train_stage(prepared, REPO / "hparams" / "demo_cpu_qmargin_sparse.yaml", RUN_OPTS, None, overrides)
    log = (prepared / "train_log.txt").read_text().splitlines()
    assert len(log) == 2 and "support_mean" in log[-1] and "accuracy" not in log[-1]
    losses = [float(re.search(r"train loss: ([0-9.e+-]+)", line).group(1)) for line in log]
    assert losses[1] < losses[0]
    (checkpoint,) = brain.checkpointer.find_checkpoints(max_num_checkpoints=None)[:1]
    saved = torch.load(checkpoint.paramfiles["classifier"])
    torch.testing.assert_close(saved["weight"], brain.modules.classifier.weight.detach())


def test_margin_override_reaches_the_loss(prepared):
    overrides = {
        "output_folder": str(prepared),
        "number_of_epochs": 1,
        "batch_size": 8,
        "channels": 16,
        "embedding_dim": 16,
        "num_workers": 0,
        "margin": 0.3,
    }
    brain = train_stage(prepared, REPO / "hparams" / "demo_cpu_aam.yaml", RUN_OPTS, None, overrides)
    # AAM ramps the margin in from epoch 1: the ramp's final value is the overridden one.
    assert brain.hparams.margin_schedule(brain.hparams.margin_ramp_end) == 0.3
    brain = train_stage(
        prepared / "qmargin",
        REPO / "hparams" / "demo_cpu_qmargin.yaml",
        RUN_OPTS,
        None,
        {**overrides, "data_folder": str(prepared / "data")},
    )
    assert brain.modules.classifier.loss.margin == 0.3
    logged = re.search(r"train margin: ([0-9.e+-]+)", (prepared / "qmargin" / "train_log.txt").read_text()).group(1)
    assert float(logged) == 0.3


def test_large_margin_fine_tuning_starts_from_the_averaged_model(prepared):
    hparams_file = str(REPO / "hparams" / "demo_cpu_qmargin.yaml")
    base = {
        "output_folder": str(prepared),
        "number_of_epochs": 2,
        "warmup_epochs": 1,
        "batch_size": 8,
        "channels": 16,
        "embedding_dim": 16,
        "num_workers": 0,
        "average_checkpoints": 2,
    }
    train_stage(prepared, hparams_file, RUN_OPTS, None, base)
    checkpointer = Experiment.from_record(prepared).hparams["checkpointer"]
    averaged = average_checkpoints(last_checkpoints(checkpointer, 2), "embedding_model")
    prototypes = torch.load(last_checkpoints(checkpointer, 1)[0].paramfiles["classifier"], weights_only=True)
    # An LR of 1e-30 leaves float32 weights as they start: the fine-tuned run must start from the average.
    lm = {**base, "lm_number_of_epochs": 1, "lm_base_lr": 1e-30, "lm_final_lr": 1e-30}
    del lm["output_folder"]
    brain = finetune_stage(prepared, prepared / "lm", RUN_OPTS, hparams_file, None, lm)
    for key, value in brain.modules.embedder.embedding_model.named_parameters():
        torch.testing.assert_close(value.detach(), averaged[key], rtol=0, atol=0)
    torch.testing.assert_close(
        brain.modules.classifier.weight.detach(), prototypes["classifier.weight"], rtol=0, atol=0
    )
    log = (prepared / "lm" / "train_log.txt").read_text()
    assert float(re.search(r"train margin: ([0-9.e+-]+)", log).group(1)) == 0.3  # lm_margin of demo_cpu_qmargin
    assert brain.hparams.crop_seconds == 3.0 and brain.hparams.speed_factors == [1.0]


def test_large_margin_stages_through_run_sh(corpus, tmp_path):
    exp = tmp_path / "exp"
    run_recipe(corpus, exp, "--stop_stage", "2")
    run_recipe(corpus, exp, "--stage", "5", "--stop_stage", "6", "--lm_number_of_epochs=1")
    results = json.loads((tmp_path / "exp_lm" / "scores" / "results.cosine.json").read_text())
    assert results["experiment"]["loss_settings"]["margin"] == 0.3 and results["experiment"]["name"] == "exp_lm"
    assert results["experiment"]["finetuned_from"] == exp.name
    assert len(list((tmp_path / "exp_lm" / "save").glob("CKPT+*"))) == 1


class _Interrupt(Exception):
    pass


def test_resume_continues_from_the_checkpoint(prepared, monkeypatch):
    hparams_file = str(REPO / "hparams" / "demo_cpu_qmargin.yaml")
    overrides = {
        "output_folder": str(prepared),
        "number_of_epochs": 2,
        "batch_size": 8,
        "channels": 32,
        "embedding_dim": 32,
        "num_workers": 0,
        "tensorboard_dir": str(prepared / "tensorboard"),
    }
    run_opts = {"device": "cpu", "ckpt_interval_steps": 2, "noprogressbar": True}
    original_fit_batch = SpeakerBrain.fit_batch
    seen = {}

    def interrupted_fit_batch(self, batch):
        if self.hparams.lr_scheduler.step_count == 3:  # after the intra-epoch checkpoint at step 2
            seen["lr"] = self.optimizer.param_groups[0]["lr"]
            seen["step_count"] = self.hparams.lr_scheduler.step_count
            raise _Interrupt
        return original_fit_batch(self, batch)

    monkeypatch.setattr(SpeakerBrain, "fit_batch", interrupted_fit_batch)
    with pytest.raises(_Interrupt):
        train_stage(prepared, hparams_file, run_opts, None, overrides)
    monkeypatch.setattr(SpeakerBrain, "fit_batch", original_fit_batch)
    (checkpoint,) = [p for p in (prepared / "save").glob("CKPT+*")]
    saved_optimizer = torch.load(checkpoint / "optimizer.ckpt")
    assert saved_optimizer["state"], "the checkpoint must hold momentum buffers"

    original_on_fit_start = SpeakerBrain.on_fit_start

    def check_on_fit_start(self):
        original_on_fit_start(self)  # loads the checkpoint
        seen["resumed_epoch"] = self.hparams.epoch_counter.current
        seen["resumed_step_count"] = self.hparams.lr_scheduler.step_count
        seen["resumed_lr"] = self.optimizer.param_groups[0]["lr"]
        seen["resumed_optimizer"] = copy.deepcopy(self.optimizer.state_dict())

    monkeypatch.setattr(SpeakerBrain, "on_fit_start", check_on_fit_start)
    brain = train_stage(prepared, hparams_file, run_opts, None, overrides)
    assert seen["resumed_epoch"] == 0  # still inside epoch 1
    assert seen["resumed_step_count"] == 2
    assert seen["resumed_lr"] == pytest.approx(brain.hparams.lr_scheduler.lr_at(2))
    for key, buffers in saved_optimizer["state"].items():
        torch.testing.assert_close(
            seen["resumed_optimizer"]["state"][key]["momentum_buffer"], buffers["momentum_buffer"]
        )
    steps_per_epoch = len(brain.train_set) // 8
    assert brain.hparams.lr_scheduler.step_count == 2 * steps_per_epoch
    assert brain.hparams.epoch_counter.current == 2
    assert list((prepared / "tensorboard").glob("events.out.tfevents.*"))


def test_sharded_head_trains_on_two_processes_and_resumes_on_one(corpus, tmp_path):
    exp = tmp_path / "exp"
    run_recipe(corpus, exp, "--nproc", "2", "--stop_stage", "2", hparams="hparams/demo_cpu_qmargin_sharded.yaml")
    (checkpoint,) = list((exp / "save").glob("CKPT+*"))
    saved = torch.load(checkpoint / "classifier.ckpt", weights_only=True)
    # the full matrices, not rank 0's shard: prototypes and their SGD momentum
    assert set(saved) == {"weight", "momentum_buffer"}
    assert saved["weight"].shape == saved["momentum_buffer"].shape == (8, 32)
    assert saved["momentum_buffer"][4:].abs().sum() > 0  # rank 1's rows are there too
    overrides = {
        "output_folder": str(exp),
        "number_of_epochs": 2,
        "warmup_epochs": 1,
        "batch_size": 8,
        "channels": 32,
        "embedding_dim": 32,
        "num_workers": 0,
    }
    brain = train_stage(exp, REPO / "hparams" / "demo_cpu_qmargin_sharded.yaml", RUN_OPTS, None, overrides)
    assert brain.hparams.epoch_counter.current == 2
    log = (exp / "train_log.txt").read_text().splitlines()
    assert [line.split(" - ")[0] for line in log] == ["epoch: 1", "epoch: 2"]


def test_ddp_with_two_cpu_processes(corpus, tmp_path):
    exp = tmp_path / "exp"
    output = run_recipe(corpus, exp, "--nproc", "2", "--stop_stage", "2")
    assert "global batch 16" in output
    assert len(list((exp / "save").glob("CKPT+*"))) == 1
    assert "epoch: 1" in (exp / "train_log.txt").read_text()


def test_two_torchrun_nodes_train_like_one_node_with_two_processes(corpus, tmp_path):
    import socket

    one_node, two_nodes = tmp_path / "one_node", tmp_path / "two_nodes"
    run_recipe(corpus, one_node, "--stop_stage", "1")
    run_recipe(corpus, one_node, "--stage", "2", "--stop_stage", "2", "--nproc", "2")
    two_nodes.mkdir()
    (two_nodes / "data").symlink_to(one_node / "data")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        "bash",
        str(RUN_SH),
        "--exp",
        str(two_nodes),
        "--hparams",
        "hparams/demo_cpu_qmargin.yaml",
        "--stage",
        "2",
        "--stop_stage",
        "2",
        "--nproc",
        "1",
        "--nnodes",
        "2",
        "--rdzv_endpoint",
        f"127.0.0.1:{port}",
        *FAST,
    ]
    env = {**os.environ, "PYTHON": sys.executable}
    nodes = [
        subprocess.Popen(
            [*command, "--node_rank", str(rank)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert any("global batch 16" in output for output in outputs)
    # Same global batch, same data split, same averaged gradients: the same loss trajectory and weights.
    assert (one_node / "train_log.txt").read_text() == (two_nodes / "train_log.txt").read_text()
    saved = [
        torch.load(next((exp / "save").glob("CKPT+*")) / "embedding_model.ckpt", weights_only=True)
        for exp in (one_node, two_nodes)
    ]
    for key, value in saved[0].items():
        if value.is_floating_point() and "running" not in key:  # BatchNorm statistics stay per process on CPU
            torch.testing.assert_close(value, saved[1][key], rtol=0, atol=0)


def test_training_from_tar_shards_through_run_sh(corpus, tmp_path):
    exp = tmp_path / "exp"
    output = run_recipe(corpus, exp, "--data_format", "shards", "--stop_stage", "2")
    index = json.loads((exp / "data" / "shards" / "shards.json").read_text())
    assert index["num_utterances"] == 48 and index["complete"]
    log = (exp / "train_log.txt").read_text().splitlines()
    assert [line.split(" - ")[0] for line in log] == ["epoch: 1"]
    assert "48 training utterances" in output and "only 6 optimiser steps" in output  # 48 // 8, from the shards
    assert len(list((exp / "save").glob("CKPT+*"))) == 1


def test_an_override_of_no_key_is_one_line_naming_the_closest_key(corpus, tmp_path):
    command = [
        sys.executable,
        str(REPO / "recipes" / "voxceleb" / "train.py"),
        "hparams/demo_cpu_qmargin.yaml",
        "--exp",
        str(tmp_path / "exp"),
        "--margn=0.3",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("did you mean 'margin'?")
    assert not (tmp_path / "exp" / "hyperparams.yaml").exists()


def test_model_size_set_by_overrides_is_the_model_the_folder_rebuilds(prepared, tmp_path):
    from speechbrain.inference.speaker import EncoderClassifier

    from qmargin_spk.stages.package import package_stage

    sizes = {
        "channels": 24,
        "dilations": [1, 3, 2, 2, 1],
        "embedding_dim": 12,
        "number_of_epochs": 1,
        "batch_size": 8,
        "num_workers": 0,
    }
    brain = train_stage(prepared, REPO / "hparams" / "demo_cpu_qmargin.yaml", RUN_OPTS, None, sizes)
    trained = brain.modules.embedder.embedding_model.state_dict()
    folder = package_stage(prepared)
    model = SpeakerModel.from_folder(folder)
    rebuilt = model.embedder.embedding_model.state_dict()
    assert {key: value.shape for key, value in rebuilt.items()} == {key: value.shape for key, value in trained.items()}
    blocks = model.embedder.embedding_model.blocks[1:4]
    assert [block.res2net_block.blocks[0].conv.dilation for block in blocks] == [3, 2, 2]
    wav = torch.randn(16000) * 0.1
    ours = model.embed(wav.numpy())[0]
    experiment = Experiment.from_record(prepared)
    embedder, _ = experiment.averaged_embedder()
    with torch.no_grad():
        stage3 = torch.nn.functional.normalize(embedder(wav[None], torch.ones(1)), dim=-1)[0].numpy()
    speechbrain = EncoderClassifier.from_hparams(source=str(folder), savedir=str(tmp_path / "sb"))
    with torch.no_grad():
        theirs = torch.nn.functional.normalize(speechbrain.encode_batch(wav[None]).squeeze(), dim=0).numpy()
    assert ours.shape == (12,) and float(ours @ stage3) > 0.99999 and float(ours @ theirs) > 0.99999


def test_the_record_repeats_the_run_and_an_old_record_says_how_to_migrate(prepared, capsys):
    exp, again = prepared, prepared / "again"
    tiny = ["--number_of_epochs=1", "--batch_size=8", "--channels=16", "--embedding_dim=16", "--num_workers=0"]
    train, score = stage_script("train"), stage_script("score")
    assert train(["hparams/demo_cpu_qmargin.yaml", "--exp", str(exp), "--device=cpu", *tiny]) == 0
    again.mkdir()
    (again / "data").symlink_to(exp / "data")
    assert train([str(exp / "hyperparams.yaml"), "--exp", str(again), "--device=cpu"]) == 0
    assert (again / "train_log.txt").read_text() == (exp / "train_log.txt").read_text()
    # A record written before composition (a flat hparams copy): later stages say how to rewrite it.
    (exp / "hyperparams.yaml").write_text("seed: 1986\noutput_folder: !PLACEHOLDER\nloss_name: qmargin\n")
    capsys.readouterr()
    where = ["--exp", str(exp), "--test_root", str(exp / "data"), "--trials", str(exp / "data" / "test.csv")]
    assert score(where) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "written before experiments were composed" in line and "running stage 2 again" in line
    assert train(["hparams/demo_cpu_qmargin.yaml", "--exp", str(exp), "--device=cpu", *tiny]) == 0  # finished
    assert "composed_from" in (exp / "hyperparams.yaml").read_text()
    assert len(list((exp / "save").glob("CKPT+*"))) == 1  # rewritten without training again
