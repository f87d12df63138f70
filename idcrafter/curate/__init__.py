"""Data curation: raw videos -> training manifests with references, masks and prompts
(docs/design.md 8.1). `idcrafter.curate.core` holds the items and the stage protocol; the stages,
presets and the runner build on it; `scripts/curate.py` is the command line."""
