"""python -m mmsep.export.gpu_check's command line on a machine without TensorRT: help, bad
usage (exit 2), a missing TensorRT (exit 1), each with one line and no traceback."""

import pytest

from mmsep.exit_codes import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE
from mmsep.export import gpu_check, tensorrt_build


def run(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_help_lists_the_options(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == EXIT_OK
    for option in ("--preset", "--precision", "--stages", "--max-batch", "--workdir", "--json"):
        assert option in out


def test_bad_precision_is_usage(capsys):
    code, _, err = run(["--precision", "int8"], capsys)
    assert code == EXIT_USAGE
    assert err.startswith(f"{gpu_check.PROG}: error:") and "int8" in err
    assert len(err.strip().splitlines()) == 1


def test_missing_tensorrt_is_exit_1_with_the_reason(capsys, monkeypatch):
    monkeypatch.setattr(tensorrt_build, "unavailable_reason", lambda: "no GPU here")
    code, _, err = run([], capsys)
    assert code == EXIT_INTERNAL
    assert err.strip() == f"{gpu_check.PROG}: cannot run: no GPU here"


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge_nonexistent"], "--preset"),
    (["--stages", "clip_text,warp_drive"], "unknown stage(s) warp_drive"),
])
def test_unknown_preset_or_stage_is_usage(capsys, monkeypatch, tmp_path, args, message):
    monkeypatch.setattr(tensorrt_build, "unavailable_reason", lambda: None)
    code, _, err = run([*args, "--workdir", str(tmp_path)], capsys)
    assert code == EXIT_USAGE, err
    assert message in err and len(err.strip().splitlines()) == 1
