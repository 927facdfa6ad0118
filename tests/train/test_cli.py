import fcntl
import json

import pytest
from click.testing import CliRunner

from mmsep.runtime.atomic import MACHINE
from mmsep.train.cli import RUN_LOCK, main

torch = pytest.importorskip("torch")


def _args(corpus, weights_dir, tables, out, *extra):
    return ["--init", str(weights_dir / "weights/mmaudio_tiny.pth"),
            "--weights-dir", str(weights_dir), "--data", str(corpus["train"]),
            "--val", str(corpus["val"]), "--out", str(out), "--cache", str(tables["cache"]),
            "--duration", "2", "--batch-size", "2", "--val-every", "2", "--log-every", "1",
            *extra]


def test_a_short_run_writes_a_loadable_ft_pt(corpus, weights_dir, tables, tmp_path):
    import mmsep.models as mm

    out = tmp_path / "run"
    out.mkdir()
    stale = out / f".checkpoint.partial-{MACHINE}-4194305-0123456789ab.pt"  # a killed run's
    stale.write_bytes(b"half")
    result = CliRunner().invoke(main, _args(corpus, weights_dir, tables, out, "--steps", "2"))
    assert result.exit_code == 0, result.output
    assert not stale.exists()
    assert "step 2/2" in result.output and "val_loss" in result.output
    net = mm.load_flow(out / "ft.pt", duration=2.0)
    assert net.config.separation and net.config.name == "tiny"
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "steps_per_s", "clips_per_s"} <= set(rows[-1])
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2]
    # a finished run continues with --resume and more steps; without --resume it is refused
    again = CliRunner().invoke(main, _args(corpus, weights_dir, tables, out, "--steps", "3",
                                           "--resume"))
    assert again.exit_code == 0, again.output
    assert "step 3/3" in again.output
    refused = CliRunner().invoke(main, _args(corpus, weights_dir, tables, out, "--steps", "3"))
    assert refused.exit_code == 2 and "pass --resume" in refused.output
    assert refused.output.startswith("mmsep-finetune: error: ")
    # continued fine-tuning keeps the separation network's input projection: the option that
    # would set it is refused rather than ignored
    args = _args(corpus, weights_dir, tables, out.with_name("more"), "--steps", "1",
                 "--init-input-proj", "zero-mix")
    args[args.index("--init") + 1] = str(out / "ft.pt")
    continued = CliRunner().invoke(main, args)
    assert continued.exit_code == 2
    assert "ft.pt is already a separation network" in continued.output
    resume_refusals(corpus, weights_dir, tables, out)


def resume_refusals(corpus, weights_dir, tables, out):
    """What --resume refuses, each before any feature is computed (the shared cache does not
    change), and a metrics file cut short by a crash that it repairs."""
    cached = sorted(tables["cache"].iterdir())

    def resume(*extra):
        return CliRunner().invoke(main, _args(corpus, weights_dir, tables, out, "--resume",
                                              *extra))

    done = resume("--steps", "3")
    assert done.exit_code == 2 and "the run is already at step 3; give --steps above" in \
        done.output
    longer = resume("--steps", "4", "--duration", "3")
    assert longer.exit_code == 2 and "cannot resume with other settings (duration 2.0 -> 3.0)" \
        in longer.output
    other = _other_encoder_weights(weights_dir, out.parent / "other_weights")
    switched = resume("--steps", "4", "--weights-dir", str(other))
    assert switched.exit_code == 2
    assert "cannot resume with other settings (weights_sha256 '" in switched.output
    metrics = (out / "metrics.jsonl").read_text()
    first, *rest = metrics.splitlines()
    for damage in ("garbage", '{"loss": 1.0}'):
        (out / "metrics.jsonl").write_text("\n".join([first, damage, *rest]) + "\n")
        bad = resume("--steps", "4")
        assert bad.exit_code == 2 and "metrics.jsonl:2: not a metrics row" in bad.output
    live = metrics + '{"step": 4, "loss": 1.0}\n'  # a run training there, past its last save
    (out / "metrics.jsonl").write_text(live)
    with open(out / RUN_LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        locked = resume("--steps", "5")
    assert locked.exit_code == 2 and "another mmsep-finetune is training" in locked.output
    assert (out / "metrics.jsonl").read_text() == live
    (out / "metrics.jsonl").write_text(metrics)
    assert sorted(tables["cache"].iterdir()) == cached
    with open(out / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 4, "lo')  # a crash mid-line
    again = resume("--steps", "4")
    assert again.exit_code == 0, again.output
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4
    (out / "checkpoint.pt").write_bytes((out / "ft.pt").read_bytes())
    wrong = resume("--steps", "5")
    assert wrong.exit_code == 2 and "not a mmsep-finetune checkpoint.pt (an ft.pt" in wrong.output


def test_an_unreadable_input_is_one_line_exit_2(corpus, weights_dir, tables, tmp_path,
                                                monkeypatch):
    """(Tests run as root, where no file is unreadable: the read fails as it would.)"""
    import mmsep.model_files

    real = mmsep.model_files.sha256_file

    def denied(path):
        if "synchformer" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(mmsep.model_files, "sha256_file", denied)
    result = CliRunner().invoke(main, _args(corpus, weights_dir, tables, tmp_path / "run",
                                            "--steps", "1"))
    assert result.exit_code == 2
    assert result.output.strip().endswith("synchformer_state_dict.pth: permission denied")


def test_a_killed_extractions_temporaries_are_removed(corpus, weights_dir, tables, tmp_path):
    import shutil

    from mmsep.runtime.atomic import MACHINE

    cache = tmp_path / "cache"
    shutil.copytree(tables["cache"], cache)  # every entry there: nothing is computed
    stale = cache / f".0123abcd.partial-{MACHINE}-4194305-0123456789ab.pt"  # no such process
    stale.write_bytes(b"half")
    result = CliRunner().invoke(main, _args(corpus, weights_dir, tables, tmp_path / "run",
                                            "--steps", "1", "--cache", str(cache)))
    assert result.exit_code == 0, result.output
    assert not stale.exists() and len(list(cache.glob("*.pt"))) == 12


def _other_encoder_weights(weights_dir, root):
    """A copy of ``weights_dir`` whose Synchformer file differs by one trailing byte."""
    import shutil

    from mmsep.models.components import SYNCHFORMER_FILE

    shutil.copytree(weights_dir, root)
    with open(root / SYNCHFORMER_FILE, "ab") as fh:
        fh.write(b"\0")
    return root


@pytest.mark.parametrize("change, message", [
    ({"--resume": None}, "no checkpoint to resume from"),
    ({"--init": "list"}, "not a readable MMAudio flow checkpoint"),
    ({"--data": "bad"}, "not valid JSON"),
    ({"--init": "missing"}, "does not exist"),
    ({"--init-input-proj": "copy"}, "'copy' is not one of"),
    ({"--device": "foo"}, "--device foo: not usable here"),
    ({"--out": "under_file"}, "which is not a directory"),
    ({"--cache": "under_file"}, "--cache"),
    ({"--out": "proc"}, "--out /proc/mmsep-test/run: cannot write ("),
    ({"--cache": "proc"}, "--cache /proc/mmsep-test/run: cannot write ("),
])
def test_bad_usage_exits_2(corpus, weights_dir, tables, tmp_path, change, message):
    (tmp_path / "bad.jsonl").write_text("{oops\n{}\n")
    (tmp_path / "afile").write_text("mine")
    files = {"list": str(corpus["train"]), "bad": str(tmp_path / "bad.jsonl"),
             "missing": str(tmp_path / "nothing.pt"), "under_file": str(tmp_path / "afile/sub"),
             "proc": "/proc/mmsep-test/run"}  # a pseudo file system: no new file, even for root
    args = _args(corpus, weights_dir, tables, tmp_path / "run", "--steps", "1")
    for key, value in change.items():
        if value is None:
            args.append(key)
        elif key in args:
            args[args.index(key) + 1] = files.get(value, value)
        else:
            args += [key, value]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "ft.pt").exists()


def test_a_damaged_cache_entry_is_named(corpus, weights_dir, tables, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(tables["cache"], cache)
    entry = sorted(cache.glob("*.pt"))[0]
    entry.write_bytes(entry.read_bytes()[:1000])  # a copy cut short
    args = _args(corpus, weights_dir, tables, tmp_path / "run", "--steps", "1")
    args[args.index("--cache") + 1] = str(cache)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert f"{entry}: damaged feature cache entry (" in result.output
    assert "delete it and run again" in result.output


def test_a_second_run_on_the_same_out_is_refused(corpus, weights_dir, tables, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / RUN_LOCK, "a") as held:  # a run training there, not yet at its first save
        fcntl.flock(held, fcntl.LOCK_EX)
        result = CliRunner().invoke(main, _args(corpus, weights_dir, tables, out, "--steps", "1"))
    assert result.exit_code == 2, result.output
    assert "another mmsep-finetune is training in this directory" in result.output
    assert sorted(p.name for p in out.iterdir()) == [RUN_LOCK]


@pytest.mark.parametrize("save_every, says", [
    (5, "no step was saved"), (1, "--resume continues from the last saved step")])
def test_ctrl_c_exits_130_and_says_whether_a_step_was_saved(corpus, weights_dir, tables, tmp_path,
                                                            monkeypatch, save_every, says):
    from mmsep.train.loop import Trainer

    train_step = Trainer.train_step

    def interrupted_after_two_steps(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted_after_two_steps)
    args = _args(corpus, weights_dir, tables, tmp_path / "run", "--steps", "5", "--save-every",
                 str(save_every), "--quiet")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines()[-1] == f"mmsep-finetune: interrupted; {says}"
    if save_every == 5:  # nothing saved: a new run in that directory starts a new metrics file
        monkeypatch.setattr(Trainer, "train_step", train_step)
        args[args.index("--steps") + 1] = "1"
        assert CliRunner().invoke(main, args).exit_code == 0
        rows = [json.loads(r) for r in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1, 1]


def test_the_run_never_writes_over_its_init(corpus, weights_dir, tables, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    init = out / "ft.pt"
    init.write_bytes((weights_dir / "weights/mmaudio_tiny.pth").read_bytes())
    args = _args(corpus, weights_dir, tables, out, "--steps", "1")
    args[args.index("--init") + 1] = str(init)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert f"--out's ft.pt {out}/ft.pt is the same file as --init {init}" in result.output
    assert init.read_bytes() == (weights_dir / "weights/mmaudio_tiny.pth").read_bytes()


def test_console_usage_errors_are_one_line_and_sigterm_interrupts(corpus, weights_dir, tables,
                                                                  tmp_path, capsys, monkeypatch):
    import os
    import signal

    from mmsep.train.cli import console
    from mmsep.train.loop import Trainer

    with pytest.raises(SystemExit) as usage:
        console(["--steps", "0"])
    assert usage.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "mmsep-finetune: error: Invalid value for '--steps': 0 is not in the range x>=1."]

    def terminated(self):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the run")

    monkeypatch.setattr(Trainer, "train_step", terminated)
    with pytest.raises(SystemExit) as stopped:
        console(_args(corpus, weights_dir, tables, tmp_path / "run", "--steps", "2", "--quiet"))
    assert stopped.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "mmsep-finetune: interrupted; no step was saved"]


def test_feature_progress_is_timed_not_counted():
    from mmsep.train.cli import PROGRESS_SECONDS, _cache_progress

    lines, now = [], [0.0]
    report = _cache_progress(lines.append, "data", clock=lambda: now[0])
    for done, seconds in ((1, 0.0), (2, 3.0), (3, PROGRESS_SECONDS), (4, PROGRESS_SECONDS + 1),
                          (5, PROGRESS_SECONDS + 2)):
        now[0] = seconds
        report(done, 5)
    assert lines == ["features (train): 1/5 clips", "features (train): 3/5 clips",
                     "features (train): 5/5 clips"]
