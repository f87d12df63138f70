"""`python -m idcrafter.demo`: serve the web demo (idcrafter/cli/demo.py; options: --help)."""

import sys

from idcrafter.cli.demo import main

sys.exit(main())
