#!/usr/bin/env python
"""`idcrafter-demo` from a checkout: idcrafter/cli/demo.py holds the code and its usage (`--help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idcrafter.cli.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
