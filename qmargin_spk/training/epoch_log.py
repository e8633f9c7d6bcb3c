"""The per-epoch training log (``train_log.txt``): one line per epoch, whatever kills and resumes happened.

A run killed after logging epoch N but before its checkpoint replays epoch N when resumed;
logging it again replaces the old line instead of adding a second ``epoch: N``.
"""

from __future__ import annotations

import re
from pathlib import Path

from speechbrain.utils.distributed import if_main_process

from qmargin_spk.utils.atomic import atomic_write_text

_EPOCH = re.compile(r"^epoch: (\d+) ")


class EpochLog:
    """``epoch: N - train loss: ..., train lr: ...`` lines in ``save_file``, rewritten atomically.

    Floats keep ``precision + 2`` significant digits.
    """

    def __init__(self, save_file: str | Path, precision: int = 4) -> None:
        self.save_file = Path(save_file)
        self.precision = precision

    def _format(self, value) -> str:
        return f"{value:.{self.precision + 2}g}" if isinstance(value, float) else str(value)

    def log_stats(
        self, stats_meta: dict, train_stats: dict | None = None, valid_stats: dict | None = None, **_
    ) -> None:
        """Write (or replace) the line of ``stats_meta["epoch"]``; lines of later epochs are dropped too.

        ``valid_stats`` (the validation metrics of the epoch, when it was validated) follow as ``valid <key>: ...``.
        """
        if not if_main_process():
            return
        epoch = int(stats_meta["epoch"])
        fields = ", ".join(
            [f"train {key}: {self._format(value)}" for key, value in (train_stats or {}).items()]
            + [f"valid {key}: {self._format(value)}" for key, value in (valid_stats or {}).items()]
        )
        line = f"epoch: {epoch} - {fields}"
        kept = []
        if self.save_file.is_file():
            for old in self.save_file.read_text(encoding="utf-8").splitlines():
                match = _EPOCH.match(old)
                if match is None or int(match.group(1)) < epoch:
                    kept.append(old)
        atomic_write_text(self.save_file, "\n".join([*kept, line]) + "\n")
