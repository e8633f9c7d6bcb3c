"""Which threshold decides a trial of a model folder: ours (``SpeakerModel.verify``) and SpeechBrain's (the card).

Ours. With a calibration the decision is ``LLR >= log((1 - P) / P)`` (Bayes). Without one it is
``cosine >= T``, T the minDCF threshold at P of the first cosine-scored list in ``model.json``
*measured with this model*: only result entries whose ``model_id`` is the model's identity count,
because a threshold measured on other weights says nothing about these.

SpeechBrain's. ``SpeakerRecognition.verify_batch(..., threshold=T)`` accepts when ``cosine > T``
(``verify_files`` always uses its built-in 0.25). The model card gives, per P, the cosine T that
reproduces our decisions (they differ only on a score exactly at T: ``>`` there, ``>=`` here):
uncalibrated, the same minDCF threshold; calibrated on the score alone, the cosine at which the
LLR ``w * cosine + b`` equals the Bayes threshold, ``(log((1 - P) / P) - b) / w``. A calibration
with quality measures (durations, imposter means) has no single cosine threshold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from qmargin_spk.calibration import Calibration, bayes_threshold
from qmargin_spk.metrics import DEFAULT_P_TARGETS
from qmargin_spk.utils.markdown import markdown_table


def own_results(info: Mapping, identity: str | None) -> tuple[list[dict], list[dict]]:
    """``model.json``'s result entries measured with the model of ``identity``, and those that name no model."""
    entries = list(info.get("results") or [])
    own = [entry for entry in entries if identity is not None and entry.get("model_id") == identity]
    return own, [entry for entry in entries if entry.get("model_id") is None]


def stored_threshold(results: Sequence[Mapping], p_target: float) -> tuple[float, str] | None:
    """``(threshold, source)``: the minDCF threshold at ``p_target`` of the first cosine-scored list, if any."""
    for entry in results:
        if entry.get("backend") != "cosine":
            continue
        point = entry.get("metrics", {}).get("min_dcf", {}).get(f"{p_target:g}")
        if point is not None:
            return float(point["threshold"]), f"uncalibrated: minDCF threshold of {entry['list']} (cosine)"
    return None


def cosine_threshold(calibration: Calibration, p_target: float) -> float | None:
    """The cosine above which a score-only calibration's LLR reaches the Bayes threshold (None: no such cosine)."""
    if calibration.uses_quality or calibration.weights[0] <= 0:
        return None
    return (bayes_threshold(p_target) - calibration.offset) / calibration.weights[0]


def speechbrain_card(info: Mapping, calibration: Calibration | None) -> list[str]:
    """The model card's section on deciding with SpeechBrain: the cosine threshold per target prior."""
    lines = [
        "## Decisions with SpeechBrain",
        "",
        "`SpeakerRecognition.from_hparams(source='DIR', savedir='...')` loads this folder. Its `verify_files`",
        "always decides at SpeechBrain's built-in threshold 0.25, which is not this model's: call",
        "`verify_batch(wavs1, wavs2, wav1_lens, wav2_lens, threshold=T)` with T for your target prior P below.",
        "SpeechBrain accepts when cosine > T, qmargin-spk when score >= T (they differ only at exactly T).",
        "",
    ]
    if calibration is not None and calibration.uses_quality:
        return lines + [
            "This folder is calibrated with quality measures (durations, imposter means): its decisions depend on",
            "more than the cosine score, so no single cosine threshold reproduces them. Use `qmargin-spk verify`.",
            "",
        ]
    if calibration is not None:
        thresholds = {p: cosine_threshold(calibration, p) for p in DEFAULT_P_TARGETS}
        source = "calibration.json: the cosine at which the calibrated LLR equals log((1 - P) / P)"
        if any(value is None for value in thresholds.values()):
            return lines + ["The calibration does not increase with the score: no cosine threshold.", ""]
    else:
        own, unnamed = own_results(info, info.get("model_identity"))
        first = next((entry for entry in own if entry.get("backend") == "cosine"), None)
        if first is None:
            why = "its results name no model (re-run stage 4)" if unnamed else "no cosine-scored list of this model"
            return lines + [f"No threshold is known ({why}): run `qmargin-spk calibrate --model DIR --scores ...`.", ""]
        thresholds = {float(p): stored_threshold([first], float(p))[0] for p in first["metrics"]["min_dcf"]}
        source = f"uncalibrated: the minDCF threshold on {first['list']} (cosine)"
    table = markdown_table(["P", "T (cosine)"], [[f"{p:g}", f"{t:.6f}"] for p, t in thresholds.items()])
    return lines + [table, "", f"Source: {source}.", ""]
