"""The command-line tools: each module has `main(argv=None) -> int`, run by the console entry points
of setup.cfg and by the thin scripts/*.py files (docs/design.md 2)."""
