"""``python -m qmargin_spk.cli``: the same as the ``qmargin-spk`` command."""

import sys

from qmargin_spk.cli import main

sys.exit(main())
