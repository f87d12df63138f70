#!/usr/bin/env python
"""`idcrafter-render` from a checkout: idcrafter/cli/render_batch.py holds the code and its usage (`--help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idcrafter.cli.render_batch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
