"""The exceptions the library raises for problems in what it was given (docs/design.md 10).

Library code (models, pipelines, data loading, training, rewards, metrics) raises these, or plain
`ValueError` / `TypeError` for a caller's programming mistake. It never raises
`idcrafter.utils.cli.InputError`: only the boundary (the command-line tools and the manifest and
job-file validation) decides that a problem is the user's, and turns these two classes into an
`InputError` naming the option the user gave (`idcrafter.utils.cli.user_file`). A plain ValueError
escaping a command-line tool is therefore a bug and keeps its traceback.

Messages are one line that a user can act on, and name the file or setting.

No torch import: the command-line tools import this before any model loads.
"""

from __future__ import annotations


class FileFormatError(ValueError):
    """A file or folder is missing, unreadable, or not what it must be.

    A damaged or incomplete checkpoint, an adapter folder of the wrong kind or that does not fit the
    model, a model folder without its config, an undecodable image or video, a bad manifest or JSONL
    line, a feature cache written with other settings, a sample the data loader cannot use.
    """


class ConfigError(ValueError):
    """Settings that are out of range or do not work together.

    An adapter trained for another base model, a request past a model's limits (size, frames,
    steps), options that contradict each other or the loaded adapter, a run resumed on another
    world size or ZeRO stage.
    """
