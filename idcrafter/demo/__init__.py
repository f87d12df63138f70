"""The web demo (`python -m idcrafter.demo`, `idcrafter-demo`): a Gradio app over the same request
checks and pipelines as `scripts/infer.py`. `idcrafter.demo.service` holds what it does without
the web (usable from Python), `idcrafter.demo.app` the page, `idcrafter.cli.demo` the command line."""

from idcrafter.demo.service import DemoModel, DemoResult, ImageService, VideoService

__all__ = ["DemoModel", "DemoResult", "ImageService", "VideoService", "build_demo", "main"]


def build_demo(*args, **kwargs):
    """`idcrafter.demo.app.build_demo` (imported on use: gradio is an optional dependency)."""
    from idcrafter.demo.app import build_demo as build

    return build(*args, **kwargs)


def main(argv=None) -> int:
    """`idcrafter.cli.demo.main`: serve the page (the command line of `python -m idcrafter.demo`)."""
    from idcrafter.cli.demo import main as run

    return run(argv)
