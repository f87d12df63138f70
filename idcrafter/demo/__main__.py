"""`python -m idcrafter.demo`: serve the web demo (options: --help)."""

import sys

from idcrafter.demo.app import main

sys.exit(main())
