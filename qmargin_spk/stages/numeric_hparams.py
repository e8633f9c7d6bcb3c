"""The rules for numeric hparams (durations, sizes, counts, rates), checked before a stage does any work.

Each key has a type (integer or number), a bound that is strict (``> 0``) or not (``>= 0``), and
whether ``null`` is allowed. The training stage checks every rule; the scoring stage checks
:data:`SCORING_RULES` before it embeds anything. A key absent from the hparams is not checked
(the code that reads it has a default), except :data:`REQUIRED`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from qmargin_spk.stages.experiment import StageError


@dataclass(frozen=True)
class Rule:
    """``value > bound`` (``strict``) or ``value >= bound``, of type ``kind``; ``nullable``: null is allowed too."""

    kind: type[numbers.Number]
    bound: float
    strict: bool = False
    nullable: bool = False

    def allows(self, value: object) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, self.kind):
            return False
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):
            return False
        return value > self.bound if self.strict else value >= self.bound

    def __str__(self) -> str:
        kind = "an integer" if self.kind is numbers.Integral else "a number"
        return f"{'null or ' if self.nullable else ''}{kind} {'>' if self.strict else '>='} {self.bound:g}"


def _at_least(bound: float, integer: bool = False, nullable: bool = False) -> Rule:
    return Rule(numbers.Integral if integer else numbers.Real, bound, strict=False, nullable=nullable)


def _above(bound: float, nullable: bool = False) -> Rule:
    return Rule(numbers.Real, bound, strict=True, nullable=nullable)


TRAINING_RULES: dict[str, Rule] = {
    "number_of_epochs": _at_least(1, integer=True),
    "batch_size": _at_least(1, integer=True),
    "num_workers": _at_least(0, integer=True),
    "num_threads": _at_least(1, integer=True, nullable=True),
    "crop_seconds": _above(0),
    "shuffle_buffer": _at_least(1, integer=True),
    "warmup_epochs": _at_least(0),
    "base_lr": _above(0),
    "final_lr": _above(0),
    "reference_batch": _at_least(1, integer=True),
    "weight_decay": _at_least(0),
    "scale": _above(0),
    "margin": _at_least(0),
    "margin_ramp_start": _at_least(0),
    "margin_ramp_end": _at_least(0),
    "keep_checkpoints": _at_least(1, integer=True),
    "valid_every": _at_least(0, integer=True, nullable=True),
    "lm_crop_seconds": _above(0),
    "lm_number_of_epochs": _at_least(1, integer=True),
    "lm_base_lr": _above(0),
    "lm_final_lr": _above(0),
    "lm_margin": _at_least(0),
}
SCORING_RULES: dict[str, Rule] = {
    "average_checkpoints": _at_least(1, integer=True),
    "extract_batch_size": _at_least(1, integer=True),
    "extract_chunk_seconds": _above(0, nullable=True),
    "extract_max_batch_seconds": _above(0),
    "cohort_utts_per_speaker": _at_least(1, integer=True),
    "asnorm_top_n": _at_least(2, integer=True),  # AS-norm needs a spread of the top scores
    "bootstrap_resamples": _at_least(0, integer=True),
}
ALL_RULES: dict[str, Rule] = {**TRAINING_RULES, **SCORING_RULES}
REQUIRED = ("number_of_epochs", "batch_size")


def check_numeric_hparams(hparams: Mapping, rules: Mapping[str, Rule] = ALL_RULES) -> None:
    """:class:`StageError` naming the first key of ``rules`` whose value breaks its rule: the key, value and rule."""
    for key, rule in rules.items():
        if key not in hparams and key not in REQUIRED:
            continue
        value = hparams.get(key)
        if not rule.allows(value):
            raise StageError(f"hparams key {key!r} must be {rule}, got {value!r}")
