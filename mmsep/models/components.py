"""Every network of one MMAudioSep deployment, loaded from disk or built at random (tiny preset).

Default file names follow the public release layout under a weights directory (the authors'
MMAudioSep layout, with MMAudio's names accepted for the flow network):

    weights/mmaudiosep_<variant>.pth               separation network (MMAudioSep; MMAudio's
                                                   generation networks:
                                                   weights/mmaudio_<variant>.pth)
    ext_weights/v1-44.pth, ext_weights/v1-16.pth   mel VAEs
    ext_weights/synchformer_state_dict.pth         Synchformer
    ext_weights/DFN5B-CLIP-ViT-H-14-384/           open_clip weights (open_clip_model.safetensors or
                                                   open_clip_pytorch_model.bin)
    ext_weights/bigvgan_v2_44khz_128band_512x/     BigVGAN v2, 44.1 kHz (config.json +
                                                   bigvgan_generator.pt)
    ext_weights/best_netG.pt                       BigVGAN v1, 16 kHz

Every path can be given explicitly instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .io import CheckpointError

VAE_FILES = {"16k": "ext_weights/v1-16.pth", "44k": "ext_weights/v1-44.pth"}
SYNCHFORMER_FILE = "ext_weights/synchformer_state_dict.pth"
CLIP_DIR = "ext_weights/DFN5B-CLIP-ViT-H-14-384"
CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
VOCODER_FILES = {"16k": "ext_weights/best_netG.pt",
                 "44k": "ext_weights/bigvgan_v2_44khz_128band_512x"}
VOCODER_WHAT = {"16k": "BigVGAN v1 file", "44k": "BigVGAN v2 directory"}
# separation (MMAudioSep) networks first, then MMAudio's generation networks
FLOW_FILES = ("weights/mmaudiosep_{}.pth", "weights/mmaudio_{}.pth")


@dataclass
class Components:
    """The networks of one deployment, all in eval mode on the CPU."""

    flow: nn.Module
    vae: nn.Module
    mel: nn.Module
    vocoder: nn.Module
    clip: nn.Module
    synchformer: nn.Module
    sources: dict[str, str]  # component name -> file it came from ("random:<seed>" when built)

    @property
    def config(self):
        return self.flow.config


def build_components(preset: str = "tiny", *, separation: bool = True, duration: float = 8.0,
                     seed: int = 0) -> Components:
    """Random-weight components; every weight is randomised (none left at upstream zero-init)."""
    from .bigvgan import build_vocoder
    from .clip import build_clip
    from .flow import build
    from .mel import MelSpectrogram
    from .presets import TINY_FEATURES
    from .randomize import randomize_
    from .synchformer import build_synchformer
    from .vae import build_vae

    flow = build(preset, separation=separation, duration=duration, seed=seed)
    mode = flow.config.mode
    tiny = flow.config.features == TINY_FEATURES
    parts = {
        "vae": build_vae(mode, tiny=tiny),
        "vocoder": build_vocoder(tiny=tiny, mode=mode),
        "clip": build_clip(tiny=tiny),
        "synchformer": build_synchformer(tiny=tiny),
    }
    # a random vocoder at unit scale drives most samples into its output clamp
    scales = {"vocoder": 0.3}
    for offset, (name, module) in enumerate(parts.items(), start=1):
        randomize_(module, seed=seed + offset, scale=scales.get(name, 1.0))
        module.eval()
    return Components(flow=flow.eval(), mel=MelSpectrogram(mode).eval(), **parts,
                      sources={name: f"random:{seed}" for name in ("flow", *parts)})


def load_components(weights_dir: str | os.PathLike | None = None, *,
                    flow: str | os.PathLike | None = None, variant: str | None = None,
                    vae: str | os.PathLike | None = None,
                    vocoder: str | os.PathLike | None = None,
                    clip: str | os.PathLike | None = None,
                    synchformer: str | os.PathLike | None = None,
                    duration: float = 8.0) -> Components:
    """Load every component from disk.

    ``flow`` is the (fine-tuned) flow checkpoint; without it, the release file of ``variant``
    under ``weights_dir`` (``flow_file``). Companions default to the release layout under
    ``weights_dir``, the vocoder by sample rate: BigVGAN v1 ``ext_weights/best_netG.pt`` at 16 kHz,
    the BigVGAN v2 directory at 44.1 kHz. A file that is not there raises CheckpointError with
    the exact path that was looked for.
    """
    from .checkpoint import load_flow
    from .clip import load_clip
    from .mel import MelSpectrogram
    from .synchformer import load_synchformer
    from .vae import load_vae

    root = Path(weights_dir) if weights_dir is not None else None

    def default(given, relative: str, what: str, option: str) -> Path:
        if given is not None:
            return Path(given)
        if root is None:
            raise CheckpointError(f"no {what} given: pass its path (--{option}, {option}=) or a "
                                  "release weights directory (--weights-dir, weights_dir=)")
        return root / relative

    if flow is None and variant is None:
        raise CheckpointError("no flow checkpoint given: pass flow=<ft.pt> or variant=<name>")
    flow_path = Path(flow) if flow is not None else flow_file(root, variant)
    net = load_flow(flow_path, duration=duration)
    mode = net.config.mode

    vae_path = default(vae, VAE_FILES[mode], "VAE checkpoint", "vae")
    sync_path = default(synchformer, SYNCHFORMER_FILE, "Synchformer checkpoint", "synchformer")
    vocoder_path = default(vocoder, VOCODER_FILES[mode], VOCODER_WHAT[mode], "vocoder")
    for path, what in ((vae_path, "VAE checkpoint"), (sync_path, "Synchformer checkpoint"),
                       (vocoder_path, VOCODER_WHAT[mode])):
        if not path.exists():
            raise CheckpointError(f"{path}: {what} not found")
    clip_path = _clip_file(default(clip, CLIP_DIR, "CLIP weights", "clip"))

    parts = {
        "vae": load_vae(vae_path, mode=mode),
        "vocoder": _vocoder_for(vocoder_path, mode),
        "clip": load_clip(clip_path),
        "synchformer": load_synchformer(sync_path),
    }
    sources = {"flow": str(flow_path), "vae": str(vae_path), "vocoder": str(vocoder_path),
               "clip": str(clip_path), "synchformer": str(sync_path)}
    return Components(flow=net, mel=MelSpectrogram(mode).eval(), **parts, sources=sources)


def _vocoder_for(path: Path, mode: str) -> nn.Module:
    """The vocoder at ``path``, refused unless it speaks the flow network's mel (rate, bands)."""
    from .bigvgan import load_vocoder
    from .presets import AUDIO_MODES

    vocoder, want = load_vocoder(path), AUDIO_MODES[mode]
    have = (vocoder.config.sampling_rate, vocoder.config.num_mels)
    if have != (want.sample_rate, want.n_mels):
        raise CheckpointError(f"{path}: a {have[0]} Hz, {have[1]}-band vocoder, but the flow "
                              f"network is mode {mode!r} ({want.sample_rate} Hz, {want.n_mels} "
                              f"bands); give {VOCODER_WHAT[mode]}")
    return vocoder


def flow_file(weights_dir: str | os.PathLike | None, variant: str) -> Path:
    """The release file of ``variant`` under ``weights_dir``: MMAudioSep's
    ``weights/mmaudiosep_<variant>.pth``, else MMAudio's ``weights/mmaudio_<variant>.pth``."""
    if weights_dir is None:
        raise CheckpointError(f"variant {variant!r} needs a weights directory to look in")
    candidates = [Path(weights_dir) / name.format(variant) for name in FLOW_FILES]
    found = next((path for path in candidates if path.exists()), None)
    if found is None:
        raise CheckpointError(f"{candidates[0]}: flow checkpoint not found (nor {candidates[1]})")
    return found


def save_components(components: Components, weights_dir: str | os.PathLike) -> dict[str, Path]:
    """Write every component in the public release layout under ``weights_dir``.

    ``load_components(weights_dir, variant=<preset>)`` reads them back. Used to stage random
    weights for tests and for trying a deployment before the real weights are at hand.
    """
    import torch

    from .clip import release_state_dict

    root = Path(weights_dir)
    config = components.flow.config
    paths = {
        "flow": root / FLOW_FILES[0 if config.separation else 1].format(config.name),
        "vae": root / VAE_FILES[config.mode],
        "synchformer": root / SYNCHFORMER_FILE,
        "clip": root / CLIP_DIR / CLIP_FILES[0],
        "vocoder": root / VOCODER_FILES[config.mode],
    }
    for path in paths.values():
        (path if path.suffix == "" else path.parent).mkdir(parents=True, exist_ok=True)
    torch.save(components.flow.state_dict(), paths["flow"])
    torch.save(components.vae.state_dict(), paths["vae"])
    torch.save({f"vfeat_extractor.{k}": v for k, v in components.synchformer.state_dict().items()},
               paths["synchformer"])
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in release_state_dict(components.clip).items()},
              str(paths["clip"]))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(paths["clip"], 0o666 & ~umask)  # safetensors creates it 0600, unlike torch.save
    _save_vocoder(components.vocoder, paths["vocoder"])
    return paths


def _save_vocoder(vocoder: nn.Module, path: Path) -> None:
    """BigVGAN v1: one ``{'generator': ...}`` file; v2: config.json + bigvgan_generator.pt."""
    import json

    import torch

    from .bigvgan import CONFIG_FILE, GENERATOR_FILE

    if path.suffix:
        torch.save({"generator": vocoder.state_dict()}, path)
        return
    (path / CONFIG_FILE).write_text(json.dumps(vocoder.config.to_dict(), indent=2))
    torch.save({"generator": vocoder.state_dict()}, path / GENERATOR_FILE)


def _clip_file(path: Path) -> Path:
    if not path.is_dir():
        if not path.exists():
            raise CheckpointError(f"{path}: CLIP weights not found")
        return path
    for name in CLIP_FILES:
        if (path / name).exists():
            return path / name
    raise CheckpointError(f"{path}: CLIP weights not found (looked for {' or '.join(CLIP_FILES)})")
