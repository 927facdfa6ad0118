import pytest
import torch
from torch import nn

from mmsep.models.io import CheckpointError, check_state_dict, load_checked, read_state_dict


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_unwraps_wrappers_and_prefixes(tmp_path):
    sd = nn.Linear(3, 2).state_dict()
    cases = {
        "bare": sd,
        "weights": {"weights": sd, "step": 7},
        "model_module": {"model": {f"module.{k}": v for k, v in sd.items()}},
        "ema_compiled": {"ema": {f"_orig_mod.{k}": v for k, v in sd.items()}, "opt": {}},
        "state_dict": {"state_dict": sd, "epoch": 1},
    }
    for name, obj in cases.items():
        got = read_state_dict(_save(obj, tmp_path / f"{name}.pth"))
        assert set(got) == {"weight", "bias"}, name
        torch.testing.assert_close(got["weight"], sd["weight"])


def test_safetensors(tmp_path):
    from safetensors.torch import save_file

    sd = nn.Linear(3, 2).state_dict()
    save_file(sd, tmp_path / "w.safetensors")
    got = read_state_dict(tmp_path / "w.safetensors")
    torch.testing.assert_close(got["bias"], sd["bias"])


def test_missing_file_names_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth: VAE not found"):
        read_state_dict(tmp_path / "nope.pth", what="VAE")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello, I am not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth: not a readable checkpoint"):
        read_state_dict(path)


def test_truncated(tmp_path):
    path = _save(nn.Linear(64, 64).state_dict(), tmp_path / "full.pth")
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: not a readable checkpoint"):
        read_state_dict(cut)


def test_no_tensors(tmp_path):
    path = _save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match=r"meta\.pth: no tensors found"):
        read_state_dict(path)


def test_directory_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="found a directory"):
        read_state_dict(tmp_path)


def test_check_state_dict_lists_every_problem():
    module = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    sd = module.state_dict()
    sd.pop("0.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["1.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError) as info:
        check_state_dict(module, sd, "ft.pt", what="flow network")
    message = str(info.value)
    assert message.startswith("ft.pt: does not match the flow network")
    assert "1 missing: 0.bias" in message
    assert "1 unexpected: extra.weight" in message
    assert "1 misshapen: 1.weight (5, 5) != (2, 3)" in message


def test_load_checked_loads_values():
    src, dst = nn.Linear(4, 3), nn.Linear(4, 3)
    load_checked(dst, src.state_dict(), "x.pth")
    torch.testing.assert_close(dst.weight, src.weight)
