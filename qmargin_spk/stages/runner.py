"""What every recipe stage script shares: its command line and how a user mistake ends.

    train.py [HPARAMS] --exp DIR [--backbone NAME] [--loss NAME] [--setting NAME] [--key=value ...]

``HPARAMS`` is an experiment file (or a run's record); ``--backbone/--loss/--setting`` pick
fragments (``--x NAME`` or ``--x=NAME``); ``--key=value`` pairs override hparams keys and are YAML
by design; SpeechBrain's own flags (``--device``, ``--distributed_backend`` ...) are run options.
Paths never go through YAML text: they arrive as values parsed by the script's argument parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import ruamel.yaml
import speechbrain as sb

from qmargin_spk.stages.compose import KINDS
from qmargin_spk.utils.messages import is_write_failure, one_line

FRAGMENT_FLAGS = tuple(f"--{kind}" for kind in KINDS)


class StageArguments(argparse.Namespace):
    """Parsed stage arguments: ``hparams``, ``exp``, fragment ``choices``, ``run_opts`` and ``overrides``."""

    hparams: str | None
    exp: str
    choices: dict
    run_opts: dict
    overrides: dict


def stage_parser(doc: str, hparams_required: bool = True) -> argparse.ArgumentParser:
    """The argument parser every stage script starts from: the hparams file, ``--exp`` and the fragment flags.

    Stages after training read the experiment's record, so their hparams file is optional.
    """
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "hparams",
        nargs=None if hparams_required else "?",
        help="experiment file (hparams/*.yaml) or a run's record (EXP/hyperparams.yaml)",
    )
    parser.add_argument("--exp", required=True, help="experiment folder (the hparams' output_folder)")
    for kind in KINDS:
        parser.add_argument(f"--{kind}", metavar="NAME", help=f"{kind} fragment (hparams/{kind}s/ or settings/)")
    return parser


def parse_stage_arguments(
    parser: argparse.ArgumentParser, argv: list[str], values: Callable[[argparse.Namespace], dict]
) -> StageArguments:
    """Parse ``argv``; the rest goes to SpeechBrain's run options and the overrides, with ``values(args)`` on top."""
    args, rest = parser.parse_known_args(argv, namespace=StageArguments())
    _, run_opts, yaml_text = sb.parse_arguments([args.hparams or "-", *rest])
    overrides: dict = {}
    for line in yaml_text.splitlines():  # one "key: value" line per --key=value; a repeated key: the last wins
        try:
            overrides.update(ruamel.yaml.YAML().load(line) or {})
        except ruamel.yaml.YAMLError as err:
            parser.error(
                f"override '--{line.replace(': ', '=', 1)}' is not valid YAML ({getattr(err, 'problem', err)})"
            )
    overrides.update(values(args))
    args.choices = {kind: getattr(args, kind) for kind in KINDS if getattr(args, kind) is not None}
    args.run_opts, args.overrides = run_opts, overrides
    return args


def stage_main(script: str, stage: Callable[[], object], user_errors: tuple[type[BaseException], ...]) -> int:
    """Run ``stage``; a user mistake (one of ``user_errors``) ends with one line on stderr and exit status 1.

    So does a file that could not be written (a full disk, a quota): the line names it.
    """
    try:
        stage()
    except (*user_errors, OSError) as err:
        if not isinstance(err, user_errors) and not is_write_failure(err):
            raise
        print(f"{script}: error: {one_line(err)}", file=sys.stderr)
        return 1
    return 0


def world_size() -> int:
    """Number of training processes (1 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
