"""One line for an error the user must act on: what ``qmargin-spk`` and the recipe stage scripts print.

Errors that list several problems (files that cannot be embedded, trial utterances missing under
the root, bad trial paths) have a summary line, one ``file[:line]: problem`` line per item and
perhaps ``... and N more``; the one line keeps the summary, the first item and a count of the rest.
"""

from __future__ import annotations

import errno
import re

from qmargin_spk.utils.atomic import WriteError

# Errors of a full disk or an exhausted quota, which end a run as a user mistake would.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_MORE = re.compile(r"\.\.\. and (\d+) more")
_ERRNO_PREFIX = re.compile(r"^\[Errno \d+\] ")


def is_write_failure(err: BaseException) -> bool:
    """Whether ``err`` is a file that was not written, or storage that ran out."""
    return isinstance(err, WriteError) or (isinstance(err, OSError) and err.errno in STORAGE_ERRNOS)


def one_line(err: BaseException) -> str:
    """``err`` as one line that names the file (and line) the user needs; see the module's docstring."""
    if isinstance(err, WriteError):
        return f"{err.filename}: not written ({err.strerror})"
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror}"
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    head, items = _ERRNO_PREFIX.sub("", lines[0]), lines[1:]
    more = 0
    if items and (match := _MORE.fullmatch(items[-1])):
        more, items = int(match.group(1)), items[:-1]
    if not items:
        return head
    rest = len(items) - 1 + more
    return f"{head.rstrip(':')}: {items[0]}" + (f" (and {rest} more)" if rest else "")
