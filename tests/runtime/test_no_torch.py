"""The runtime never imports torch: a whole mmsep-run request in a process where torch is blocked
and every attempt to import it is recorded."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# blocks torch and records every attempt to import it (also used by tests/scale)
BLOCKER = r"""
import builtins, importlib, importlib.abc, json, pkgutil, sys

attempts = []

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            attempts.append(name)
            raise ImportError(f"torch is blocked in this test ({name})")
        return None

real_import = builtins.__import__

def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and (name == "torch" or name.startswith("torch.")):
        attempts.append(name)
    return real_import(name, globals, locals, fromlist, level)

sys.meta_path.insert(0, Blocker())
builtins.__import__ = recording_import
sys.modules["torch"] = None

# run a console main with this process's arguments; print its exit code, the torch import
# attempts, the torch modules and the mmsep.models/export modules loaded, with facts, as JSON
def run_and_report(main, **facts):
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
    loaded = sorted(m for m, v in sys.modules.items()
                    if v is not None and (m == "torch" or m.startswith("torch.")))
    forbidden = sorted(m for m in sys.modules if m.startswith(("mmsep.models", "mmsep.export")))
    print(json.dumps({"code": code, "attempts": attempts, "loaded": loaded,
                      "forbidden": forbidden, **facts}))
"""

SCRIPT = BLOCKER + r"""
import mmsep.runtime
modules = [m.name.removeprefix("mmsep.runtime.")
           for m in pkgutil.walk_packages(mmsep.runtime.__path__, "mmsep.runtime.")]
for name in modules:
    importlib.import_module(f"mmsep.runtime.{name}")
for name in mmsep.runtime.__all__:
    getattr(mmsep.runtime, name)

from mmsep.runtime.cli import main
run_and_report(main, modules=modules)
"""


def test_runtime_runs_without_torch(model_dir, media, tmp_path):
    out, muxed = tmp_path / "o.wav", tmp_path / "o.mp4"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, "--model", str(model_dir), "--video", str(media["av"]),
         "--text", "a dog", "--steps", "1", "-o", str(out), "--mux", str(muxed), "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, proc.stderr
    assert report["attempts"] == [] and report["loaded"] == [] and report["forbidden"] == []
    assert {"separator", "backends", "backends.ort", "backends.tensorrt", "video", "audio", "cli",
            "mux"} <= set(report["modules"])
    assert out.is_file() and muxed.is_file()
