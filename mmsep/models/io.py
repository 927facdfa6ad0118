"""Reading weight files: one place for unwrapping, prefix stripping and clear errors."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

# Keys under which training scripts and releases nest the actual state dict.
WRAPPER_KEYS = ("ema", "weights", "model", "state_dict", "generator", "module", "net", "params")
STRIP_PREFIXES = ("module.", "_orig_mod.")
# ema_pytorch's EMA keeps the averaged network under this prefix, beside the online one
EMA_PREFIXES = ("ema_model.",)


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message names the file and what is wrong."""


# what mmsep-finetune's checkpoint.pt holds (the network's state dict is its "net")
TRAINING_CHECKPOINT_KEYS = frozenset({"step", "options", "world", "net", "ema", "optimizer"})


def read_state_dict(path: str | os.PathLike, *, what: str = "checkpoint",
                    wrapper_keys: Iterable[str] = WRAPPER_KEYS,
                    fits: Callable[[dict], bool] | None = None) -> dict[str, torch.Tensor]:
    """Load a tensor dictionary from a .pth/.pt/.ckpt/.bin or .safetensors file.

    Descends through the usual wrappers (``unwrap_state_dict``; ``fits`` tells the wanted
    network's state dict from others), strips ``module.`` / ``_orig_mod.`` prefixes and drops
    non-tensor entries. Raises CheckpointError naming the file for anything unusable.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: {what} not found")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: expected a {what} file, found a directory")
    if not os.access(path, os.R_OK):  # safetensors would call it "not found"
        raise CheckpointError(f"{path}: cannot read the {what} (permission denied)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:  # torch.load / safetensors raise a zoo of types on bad files
        if "Unsupported global" in str(exc):  # torch's safe unpickler met a class
            raise CheckpointError(
                f"{path}: holds Python objects besides tensors, which mmsep does not unpickle "
                f"(it could run code); save the state dict alone, torch.save(net.state_dict(), "
                "path)") from None
        text = str(exc).split("WeightsUnpickler error:")[-1]  # past torch's advice, if any
        detail = next((line.strip() for line in text.splitlines() if line.strip()), "")
        raise CheckpointError(
            f"{path}: not a readable {what} (truncated or not a PyTorch/safetensors file: "
            f"{type(exc).__name__}{': ' if detail else ''}{detail[:200]})") from exc
    if isinstance(obj, dict) and TRAINING_CHECKPOINT_KEYS <= obj.keys():
        raise CheckpointError(f"{path}: a mmsep-finetune training checkpoint (checkpoint.pt), "
                              f"not a {what}; give the ft.pt beside it")
    state = unwrap_state_dict(obj, wrapper_keys, fits=fits, name=path)
    if not state:
        raise CheckpointError(f"{path}: no tensors found; this is not a {what}")
    return state


def unwrap_state_dict(obj, wrapper_keys: Iterable[str] = WRAPPER_KEYS, *,
                      fits: Callable[[dict], bool] | None = None,
                      name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside ``obj``: of the tensor dictionaries under its wrapper keys (depth
    first, in ``wrapper_keys``' order, ``obj``'s own tensors last), the first that ``fits``
    accepts, else the first that holds tensors. Training checkpoints keep other tensor
    dictionaries beside the network's (an EMA library's own layout, an optimiser): a warning
    names the entry used when an earlier one did not fit."""
    found = [(where, state) for where, candidate in _candidates(obj, tuple(wrapper_keys), ())
             if (state := _tensors(candidate))]
    if not found:
        return {}
    if fits is not None:
        chosen = next((i for i, (_, state) in enumerate(found) if fits(state)), 0)
        if chosen:
            import warnings

            warnings.warn(f"{name}: using its {_entry(found[chosen][0])} (its "
                          f"{_entry(found[0][0])} is not this network's state dict)",
                          stacklevel=2)
        return found[chosen][1]
    return found[0][1]


def _entry(where: tuple[str, ...]) -> str:
    return "".join(f"[{key!r}]" for key in where) or "top level"


def _candidates(obj, wrapper_keys: tuple[str, ...], where: tuple[str, ...]):
    """(keys to it, mapping) of every tensor dictionary ``unwrap_state_dict`` considers."""
    if not isinstance(obj, Mapping):
        return
    if not _mostly_tensors(obj):
        for key in wrapper_keys:
            if isinstance(obj.get(key), Mapping):
                yield from _candidates(obj[key], wrapper_keys, (*where, key))
    for prefix in EMA_PREFIXES:
        averaged = {k[len(prefix):]: v for k, v in obj.items()
                    if isinstance(k, str) and k.startswith(prefix)}
        if averaged:
            yield (*where, prefix + "*"), averaged
    yield where, obj


def _tensors(obj: Mapping) -> dict[str, torch.Tensor]:
    """``obj``'s tensor entries, their keys without ``STRIP_PREFIXES``."""
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor) or not isinstance(key, str):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        state[key] = value
    return state


def _mostly_tensors(obj: Mapping) -> bool:
    values = list(obj.values())
    return bool(values) and sum(isinstance(v, torch.Tensor) for v in values) * 2 > len(values)


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     *, what: str = "checkpoint", limit: int = 8) -> None:
    """Raise one CheckpointError listing missing, unexpected and misshapen tensors."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
        if keys:
            more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:limit])}{more}")
    if problems:
        raise CheckpointError(f"{os.fspath(path)}: does not match the {what}: "
                              + "; ".join(problems))


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 *, what: str = "checkpoint") -> nn.Module:
    """Strictly load ``state`` into ``module`` after checking it, with dtypes cast to the
    module's."""
    check_state_dict(module, state, path, what=what)
    check_finite(state, path, what=what)
    module.load_state_dict(dict(state), strict=True)
    return module


def check_finite(state: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                 what: str = "checkpoint", limit: int = 4) -> None:
    """Raise CheckpointError naming the tensors that hold NaN or infinite values (a training
    run that diverged): every output would be NaN."""
    bad = [k for k, v in state.items()
           if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" (+{len(bad) - limit} more)" if len(bad) > limit else ""
        raise CheckpointError(f"{os.fspath(path)}: the {what} holds NaN or infinite values in "
                              f"{', '.join(bad[:limit])}{more} (a training run that diverged?)")
