"""Settings from a YAML or JSON file for every command-line tool: `--config FILE`.

The file's keys are option names (max_steps or max-steps); its values go through the same parser
as the command line (same converters, same one-line errors), and options typed on the command line
override them. Training saves its resolved settings as such a file in the run folder
(`idcrafter.train.cli.save_settings`), so a run can be repeated with `--config run/config.yaml`;
inference, evaluation and batch rendering read the same kind of file.

No torch here: a tool that stops on a bad file stops fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from idcrafter.utils.cli import InputError, check_input_file

__all__ = ["NOT_SETTINGS", "add_config_argument", "config_argv", "parse_command_line", "parse_settings"]

# Options that are not settings: the file itself, and what the launcher passes.
NOT_SETTINGS = ("help", "config", "local_rank")


def add_config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML or JSON file of settings (keys: option names, e.g. max_steps or max-steps); "
                        "options on the command line override it")


def _option_string(action: argparse.Action) -> str:
    return next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])


def config_argv(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The settings file `path` as command-line tokens for `parser`: the same converters and
    checks as typed options, so a bad value gets the command line's message.

    Keys are option names without the dashes (max_steps or max-steps); an unknown key, a
    non-mapping file, or a value of the wrong shape is an InputError naming the file and key.
    """
    import yaml

    check_input_file(path, "--config")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))  # JSON is YAML too
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"--config {path}: not valid YAML or JSON ({reason})") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: must hold a mapping of option names to values, not {type(data).__name__}")
    actions = {}
    for a in parser._actions:
        if a.option_strings and a.dest not in NOT_SETTINGS:  # by dest (max_steps) and by flag (max-steps, set)
            actions.update({s.lstrip("-").replace("-", "_"): a for s in a.option_strings}, **{a.dest: a})
    argv: list[str] = []
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        action = actions.get(name)
        if action is None:
            raise InputError(f"--config {path}: unknown key {key!r} (not an option; see --help)")
        flag = _option_string(action)
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise InputError(f"--config {path}: {key} must be true or false, got {value!r}")
            argv += [flag] if value else []
        elif value is None:
            if action.required:
                raise InputError(f"--config {path}: {key} needs a value")
            continue  # null: the option's default
        elif action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
            items = value if isinstance(value, list) else [value]
            if any(isinstance(v, (dict, list)) for v in items):
                raise InputError(f"--config {path}: {key} must be a list of values")
            if isinstance(action, argparse._AppendAction):
                for item in items:
                    argv.append(f"{flag}={_text(item)}")
            elif items:
                argv += [flag, *(_text(v) for v in items)]
        else:
            if isinstance(value, (dict, list)):
                raise InputError(f"--config {path}: {key} must be a single value, got {value!r}")
            argv.append(f"{flag}={_text(value)}")
    return argv


def _text(value) -> str:
    """A YAML scalar as the command line would spell it (true -> true, 1e-05 -> 1e-05)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_settings(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv` (default: sys.argv[1:]) with the settings of `--config FILE` before it: the
    command line wins over the file (for repeated options such as --reward-option, the command line's
    occurrences replace the file's)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return parser.parse_args(argv)
    from_file = config_argv(parser, known.config)
    given = {a.dest for a in parser._actions if a.option_strings and any(
        tok == s or tok.startswith(s + "=") for tok in argv for s in a.option_strings)}
    kept = []
    for tok in from_file:  # drop the file's repeated options that the command line sets
        flag = tok.split("=", 1)[0]
        action = parser._option_string_actions.get(flag)
        if action is not None and isinstance(action, argparse._AppendAction) and action.dest in given:
            continue
        kept.append(tok)
    return parser.parse_args(_drop_list_values(parser, kept, given) + argv)


def _drop_list_values(parser: argparse.ArgumentParser, tokens: list[str], given: set[str]) -> list[str]:
    """Remove from `tokens` the list options (nargs +/*) the command line also gives: argparse keeps
    the last occurrence anyway, but a list followed by positional-looking values is ambiguous."""
    out, skip = [], False
    for tok in tokens:
        if tok.startswith("--"):
            action = parser._option_string_actions.get(tok.split("=", 1)[0])
            skip = action is not None and action.nargs in ("+", "*") and action.dest in given
        if not skip:
            out.append(tok)
    return out


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parse_settings` for the tools: a bad --config file exits like a bad option (one line,
    exit code 2), before anything else runs."""
    try:
        return parse_settings(parser, argv)
    except InputError as err:
        parser.exit(2, f"error: {str(err).splitlines()[0]}\n")
