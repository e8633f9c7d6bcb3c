"""Composed experiments: fragments merged into one namespace, precedence, refusals, the record, the registries."""

from pathlib import Path

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from qmargin_spk.losses import HEADS, LOSSES, SpeakerHead, build_head
from qmargin_spk.losses.registry import HeadSettingsError
from qmargin_spk.losses.stats import PosteriorStats
from qmargin_spk.models import ARCHITECTURES, DescriptionError, build_backbone, validate_backbone
from qmargin_spk.stages.compose import KINDS, CompositionError, compose

REPO = Path(__file__).resolve().parents[1]
HPARAMS = REPO / "hparams"
OUT = {"output_folder": "/nonexistent/exp"}
SMALL_SIZES = {"ecapa_tdnn": {"channels": 8}}  # overrides that keep a backbone small (others: their demo sizes)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture()
def toy(tmp_path):
    """A toy fragment tree: a setting, a backbone with per-setting sizes, two losses; one experiment file."""
    write(
        tmp_path / "settings" / "small.yaml",
        "seed: 3\nsample_rate: 16000\noutput_folder: !PLACEHOLDER\ntwice: !ref <width> * 2\n",
    )
    write(tmp_path / "backbones" / "toy.yaml", "per_setting:\n    small: {width: 4}\n    big: {width: 64}\ndepth: 2\n")
    write(tmp_path / "losses" / "first.yaml", "loss_name: first\nalpha: 1.5\nscale: 10.0\n")
    write(tmp_path / "losses" / "second.yaml", "loss_name: second\nscale: 30.0\n")
    return write(tmp_path / "exp.yaml", "backbone: toy\nloss: first\nsetting: small\nalpha: 1.75\n")


def loaded(composition):
    return load_hyperpyyaml(composition.text)


def test_fragments_merge_into_one_namespace_with_refs_across_them(toy):
    hparams = loaded(compose(toy, overrides=OUT))
    assert hparams["twice"] == 8  # the setting refers to the backbone's per-setting size
    assert (hparams["depth"], hparams["loss_name"], hparams["seed"]) == (2, "first", 3)
    assert "per_setting" not in hparams


def test_experiment_file_wins_over_fragments_and_overrides_win_over_all(toy):
    assert loaded(compose(toy, overrides=OUT))["alpha"] == 1.75
    hparams = loaded(compose(toy, overrides={**OUT, "alpha": 2.0, "width": 5}))
    assert hparams["alpha"] == 2.0 and hparams["twice"] == 10  # a per-setting size is an ordinary key


def test_setting_flag_picks_the_backbones_sizes_for_that_setting(toy, tmp_path):
    write(tmp_path / "settings" / "big.yaml", (tmp_path / "settings" / "small.yaml").read_text())
    assert loaded(compose(toy, {"setting": "big"}, OUT))["width"] == 64


def test_a_key_of_two_fragments_is_an_error_naming_both_files(toy, tmp_path):
    write(tmp_path / "backbones" / "toy.yaml", "per_setting:\n    small: {width: 4}\nscale: 1.0\n")
    with pytest.raises(CompositionError, match=r"'scale'.*backbones/toy.yaml.*losses/first.yaml"):
        compose(toy, overrides=OUT)
    write(toy, toy.read_text() + "scale: 5.0\n")  # set by the experiment file: allowed, and it wins
    assert loaded(compose(toy, overrides=OUT))["scale"] == 5.0


def test_loss_flag_replaces_the_loss_and_drops_the_experiment_keys_set_for_the_old_one(toy):
    composition = compose(toy, {"loss": "second"}, OUT)
    hparams = loaded(composition)
    assert hparams["loss_name"] == "second" and "alpha" not in hparams and hparams["scale"] == 30.0
    (notice,) = composition.notices
    assert "--loss second replaces first: dropped alpha" in notice
    assert composition.choices == {"setting": "small", "backbone": "toy", "loss": "second"}


def test_unknown_override_is_refused_naming_the_closest_key(toy):
    with pytest.raises(CompositionError, match=r"--scal: no such key .* did you mean 'scale'\?"):
        compose(toy, overrides={**OUT, "scal": 3})


def test_unknown_fragment_names_the_known_ones(toy):
    with pytest.raises(
        CompositionError,
        match=r"no loss fragment 'third' \(known: aam, cosface, entmax, first, qmargin, second, sphereface2, "
        r"subcenter_aam\)",
    ):
        compose(toy, {"loss": "third"}, OUT)
    with pytest.raises(CompositionError, match="no sizes for setting 'tiny'"):
        write(toy.parent / "settings" / "tiny.yaml", "seed: 1\n")
        compose(toy, {"setting": "tiny"}, OUT)


def test_the_record_loads_alone_and_repeats_the_composition(toy, tmp_path):
    composition = compose(toy, {"loss": "second"}, {**OUT, "width": 6})
    record = write(tmp_path / "exp" / "hyperparams.yaml", composition.text)
    again = compose(record)
    assert again.text == composition.text and loaded(again) == loaded(composition)
    assert again.choices == composition.choices and again.keys_of("backbone") == composition.keys_of("backbone")
    with pytest.raises(CompositionError, match="names no fragments"):
        compose(record, {"loss": "first"})


@pytest.mark.parametrize("experiment", sorted(p.name for p in HPARAMS.glob("*.yaml")))
def test_experiment_files_name_one_fragment_of_each_kind_and_compose(experiment):
    text = (HPARAMS / experiment).read_text()
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(("#", " "))]
    assert sorted(keys[:3]) == sorted(KINDS)
    assert set(keys) <= {*KINDS, "head"}  # everything else is said once, in a fragment
    backbone = next(line.split(":")[1].strip() for line in text.splitlines() if line.startswith("backbone:"))
    hparams = loaded(compose(HPARAMS / experiment, overrides={**OUT, **SMALL_SIZES.get(backbone, {})}))
    head = hparams["classifier"](num_classes=5, embedding_dim=hparams["embedding_dim"])
    assert isinstance(head, SpeakerHead)
    settings = head.loss_settings()
    label = settings["loss"] if settings["head"] == "dense" else f"{settings['loss']}_{settings['head']}"
    assert experiment.endswith(f"_{label}.yaml")


def test_swapping_the_loss_and_setting_builds_what_the_old_separate_file_built():
    # The values the twelve separate files held before composition (vox2 AAM: scale 32, ramp 20-40).
    hparams = loaded(compose(HPARAMS / "vox2_ecapa_qmargin.yaml", {"loss": "aam"}, {**OUT, "channels": 8}))
    head = hparams["classifier"](num_classes=5, embedding_dim=192)
    assert head.loss_settings() == {"loss": "aam", "head": "dense", "scale": 32.0, "margin": 0.2}
    assert (hparams["margin_ramp_start"], hparams["margin_ramp_end"], hparams["crop_seconds"]) == (20, 40, 2.0)
    demo = loaded(compose(HPARAMS / "vox2_ecapa_qmargin.yaml", {"setting": "demo_cpu"}, OUT))
    assert (demo["alpha"], demo["scale"], demo["channels"], demo["embedding_dim"]) == (1.5, 10.0, 128, 128)


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_every_registered_head_keeps_the_head_contract(kind):
    torch.manual_seed(0)
    settings = {"alpha": 1.5, "scale": 10.0, "margin": 0.2}
    head = build_head(6, 4, kind, "qmargin", **settings)
    assert isinstance(head, SpeakerHead) and head.num_classes == 6
    assert head.loss_settings() == {"loss": "qmargin", "head": kind, **settings}
    embeddings, labels = torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1, 2, 3, 5])
    loss = head(embeddings, labels)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and embeddings.grad is not None
    assert isinstance(head.stats, PosteriorStats) and head.stats.batch_size == 5
    head.margin, head.scale = 0.1, 5.0
    assert (head.margin, head.scale) == (0.1, 5.0)
    rows = torch.randn(6, 4)
    head.load_full_weight(rows)
    torch.testing.assert_close(head.weight.detach(), rows)
    assert head.model_parallel == (kind == "sharded")


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_registered_loss_reports_the_settings_it_was_built_with(loss):
    accepted = {
        "qmargin": {"alpha": 1.25, "scale": 7.0, "margin": 0.1},
        "entmax": {"alpha": 1.25, "scale": 7.0},
        "aam": {"scale": 7.0, "margin": 0.1},
        "cosface": {"scale": 7.0, "margin": 0.1},
        "subcenter_aam": {"scale": 7.0, "margin": 0.1, "sub_centers": 2, "top_k": 1, "penalty": 0.05},
        "sphereface2": {"scale": 7.0, "margin": 0.1, "lanbuda": 0.6, "t": 2, "margin_type": "C"},
    }[loss]
    head = build_head(3, 4, "dense", loss, **accepted)
    assert head.loss_settings() == {"loss": loss, "head": "dense", **accepted}


def test_a_head_or_setting_that_does_not_exist_is_one_clear_error():
    with pytest.raises(HeadSettingsError, match="computes the qmargin loss only"):
        build_head(3, 4, "sparse", "aam")
    with pytest.raises(HeadSettingsError, match=r"takes no \['alpha'\]"):
        build_head(3, 4, "dense", "aam", alpha=1.5)
    with pytest.raises(HeadSettingsError, match="unknown head 'wide'"):
        build_head(3, 4, "wide", "qmargin")


def test_architecture_registry_validates_descriptions_before_building():
    description = {
        "architecture": "ecapa_tdnn",
        "input_size": 20,
        "channels": [8, 8, 8, 8, 24],
        "kernel_sizes": [5, 3, 3, 3, 1],
        "dilations": [1, 2, 3, 4, 1],
        "attention_channels": 4,
        "lin_neurons": 6,
    }
    assert {"ecapa_tdnn", "resnet34"} <= set(ARCHITECTURES)
    model = build_backbone(description)
    assert model(torch.randn(2, 50, 20)).shape == (2, 1, 6)
    with pytest.raises(DescriptionError, match="unknown architecture 'resnet'"):
        validate_backbone({**description, "architecture": "resnet"})
    with pytest.raises(DescriptionError, match=r"no setting \['activation'\]"):
        validate_backbone({**description, "activation": "!new:os.system"})
    with pytest.raises(DescriptionError, match="'channels' must be list of int"):
        validate_backbone({**description, "channels": "8"})
