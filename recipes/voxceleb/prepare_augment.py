#!/usr/bin/env python3
"""Stage 0: list MUSAN's noise, music and babble and RIRS_NOISES' impulse responses for training augmentation.

    python recipes/voxceleb/prepare_augment.py --out EXP/data/augment [--musan DIR] [--rirs DIR] \\
        [--download DIR [--mirror URL]]

``--musan`` is an unpacked MUSAN (``musan/`` with noise/, music/, speech/, or the folder holding it),
``--rirs`` an unpacked RIRS_NOISES (or the folder holding it). ``--download DIR`` fetches what is not
given from OpenSLR into DIR (resumed when interrupted, MD5 checked against the published one) and
unpacks it there; ``--mirror`` names another OpenSLR host (same paths, same checksums). Writes
``noise.list``, ``music.list``, ``babble.list`` and ``rir.list`` into ``--out`` (one absolute path a
line), which the settings' ``augment_lists`` key reads (docs/training.md, "Noise and reverberation").
"""

from __future__ import annotations

import argparse
import logging
import sys

from qmargin_spk.data.augment_lists import AugmentListError, write_augment_lists
from qmargin_spk.data.download import PUBLISHED, DownloadError, download_and_unpack
from qmargin_spk.utils.messages import is_write_failure, one_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", required=True, help="folder for the lists (run.sh: EXP/data/augment)")
    parser.add_argument("--musan", metavar="DIR", help="unpacked MUSAN")
    parser.add_argument("--rirs", metavar="DIR", help="unpacked RIRS_NOISES")
    parser.add_argument("--download", metavar="DIR", help="download and unpack what is not given into DIR")
    parser.add_argument("--mirror", metavar="URL", help="OpenSLR mirror, e.g. https://us.openslr.org")
    args = parser.parse_args(argv)
    if args.musan is None and args.rirs is None and args.download is None:
        parser.error("give --musan DIR, --rirs DIR or --download DIR")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        musan, rirs = args.musan, args.rirs
        for name in ("musan", "rirs_noises"):
            if args.download is None or (musan if name == "musan" else rirs) is not None:
                continue
            archive = PUBLISHED[name].on_mirror(args.mirror) if args.mirror else PUBLISHED[name]
            print(f"prepare_augment.py: {archive.url} -> {args.download}", flush=True)
            unpacked = download_and_unpack(archive, args.download)
            musan, rirs = (unpacked, rirs) if name == "musan" else (musan, unpacked)
        lists = write_augment_lists(args.out, musan=musan, rirs=rirs)
    except (AugmentListError, DownloadError, OSError) as err:
        if isinstance(err, OSError) and not is_write_failure(err) and err.filename is None:
            raise
        print(f"prepare_augment.py: error: {one_line(err)}", file=sys.stderr)
        return 1
    print(lists.report())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
