"""docs/design.md 10: user errors and bugs are told apart. The library raises FileFormatError /
ConfigError (or plain ValueError for a caller's mistake); only the boundary turns the first two into
InputError (one line, exit 2), so a bug escaping a command-line tool keeps its traceback."""

from __future__ import annotations

import pytest
from PIL import Image

from idcrafter.cli import infer
from idcrafter.utils.cli import EXIT_BAD_INPUT, InputError, user_file
from idcrafter.utils.errors import ConfigError, FileFormatError
from idcrafter.video import infer as video_infer


def converted(err: BaseException, flag: str = "") -> InputError:
    with pytest.raises(InputError) as info, user_file(flag):
        raise err
    assert info.value.__suppress_context__  # one line: the library's traceback is not chained on
    return info.value


def test_user_file_names_the_flag_once():
    assert str(converted(FileFormatError("adapter.json is damaged"), "--adapter")) == "--adapter: adapter.json is damaged"
    assert str(converted(ConfigError("size 4096 past 512"), "--size")) == "--size: size 4096 past 512"
    # a message that already starts with the flag, or no flag: the message as it is
    assert str(converted(FileFormatError("--adapter a: damaged"), "--adapter")) == "--adapter a: damaged"
    assert str(converted(ConfigError("--frames 99: past 81"))) == "--frames 99: past 81"
    missing = FileNotFoundError(2, "No such file or directory", "/data/x.png")
    assert str(converted(missing, "--refs")) == "--refs: /data/x.png: No such file or directory"
    assert str(converted(FileNotFoundError("checkpoint gone"), "--resume")) == "--resume: checkpoint gone"


@pytest.mark.parametrize("bug", [ValueError("bug"), KeyError("bug"), TypeError("bug"), RuntimeError("bug")])
def test_user_file_lets_bugs_through_untouched(bug):
    with pytest.raises(type(bug)) as info, user_file("--adapter"):
        raise bug
    assert info.value is bug and not isinstance(info.value, InputError)


def test_a_cli_shows_a_bug_and_reports_a_bad_file(tmp_path, monkeypatch, capsys):
    """`idcrafter infer --dry-run`: the same library call (reading a reference) raising a plain ValueError
    propagates out of main(); raising FileFormatError on the user's file is exit 2 with one line."""
    ref = tmp_path / "ref.png"
    Image.new("RGB", (16, 16)).save(ref)
    argv = ["--refs", str(ref), "--prompt", "a cat", "--out", str(tmp_path / "o.mp4"), "--dry-run", "--mode", "video"]
    assert infer.main(argv) == 0
    capsys.readouterr()

    def bug(path, what="reference image"):
        raise ValueError("bug")

    monkeypatch.setattr(video_infer, "load_rgb", bug)
    with pytest.raises(ValueError, match="^bug$") as info:
        infer.main(argv)
    assert type(info.value) is ValueError

    def damaged(path, what="reference image"):
        raise FileFormatError(f"{what} {path} cannot be read (damaged)")

    monkeypatch.setattr(video_infer, "load_rgb", damaged)
    assert infer.main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err == f"error: --refs: reference image {ref} cannot be read (damaged)\n"
    assert not (tmp_path / "o.mp4").exists()


def test_a_real_damaged_reference_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    argv = ["--refs", str(tmp_path / "bad.png"), "--prompt", "a cat", "--out", str(tmp_path / "o.mp4"), "--dry-run",
            "--mode", "video"]
    assert infer.main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --refs: reference image {tmp_path / 'bad.png'} cannot be read")
