"""One explicit export module per stage graph (no patched forwards).

Each wrapper's forward takes the stage's inputs in contract order and returns its outputs in
contract order (mmsep.stages.build_stage_specs). Each is registered against its stage name
(``@wrapper(Stage.X)``) and built the same way, ``from_components(components, geometry)``;
``stage_modules`` builds one per stage the specs list.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.components import Components
from ..models.flow import Conditions, MMAudioFlow
from ..models.presets import CLIP_IMAGE_SIZE, SYNC_FPS, SYNC_IMAGE_SIZE, SYNC_SEGMENT_FRAMES, \
    SYNC_SEGMENT_STRIDE, SYNC_TOKENS_PER_SEGMENT
from ..models.sampler import guided_euler_step, mixture_latent
from ..stages import NORMALIZED_MEAN, POSTERIOR_SAMPLE, Geometry, Stage, StageSpec, \
    build_stage_specs, stage_names

WRAPPERS: dict[str, type[nn.Module]] = {}


def wrapper(stage: str):
    """Register a class as the export module of ``stage``."""
    def register(cls):
        WRAPPERS[stage] = cls
        return cls
    return register


class _NetworkCall(nn.Module):
    """A stage that is one call of one component network: ``network.<method>(x)``, or
    ``network(x)`` when ``method`` is None."""

    component: str
    method: str | None = None

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    @classmethod
    def from_components(cls, components: Components, geometry: Geometry) -> nn.Module:
        return cls(getattr(components, cls.component))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = self.network if self.method is None else getattr(self.network, self.method)
        return call(x)


@wrapper(Stage.CLIP_IMAGE)
class ClipImageStage(_NetworkCall):
    component, method = "clip", "encode_image"


@wrapper(Stage.CLIP_TEXT)
class ClipTextStage(_NetworkCall):
    component, method = "clip", "encode_text"


@wrapper(Stage.SYNC)
class SyncStage(_NetworkCall):
    component = "synchformer"


class _LatentStats(nn.Module):
    """Holds a copy of the flow network's latent statistics (not the whole network)."""

    def __init__(self, flow: MMAudioFlow):
        super().__init__()
        self.register_buffer("latent_mean", flow.latent_mean.detach().clone().float())
        self.register_buffer("latent_std", flow.latent_std.detach().clone().float())


@wrapper(Stage.MIX_ENCODER)
class MixEncoderStage(_LatentStats):
    """Mixture waveform -> the normalised posterior mean (``normalized-mean``)."""

    convention = NORMALIZED_MEAN

    def __init__(self, mel: nn.Module, vae: nn.Module, flow: MMAudioFlow):
        super().__init__(flow)
        self.mel = mel
        self.vae = vae

    @classmethod
    def from_components(cls, components: Components, geometry: Geometry) -> nn.Module:
        """The encoder of the geometry's mixture latent convention."""
        encoder = MIX_ENCODERS[geometry.mixture_latent]
        return encoder(components.mel, components.vae, components.flow)

    def encode(self, waveform: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return mixture_latent(waveform, self.mel, self.vae, self.latent_mean, self.latent_std,
                              convention=self.convention, noise=noise)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.encode(waveform, None)


class PosteriorMixEncoderStage(MixEncoderStage):
    """Mixture waveform + standard-normal noise -> the posterior sample (``posterior-sample``)."""

    convention = POSTERIOR_SAMPLE

    def forward(self, waveform: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.encode(waveform, noise)


MIX_ENCODERS = {NORMALIZED_MEAN: MixEncoderStage, POSTERIOR_SAMPLE: PosteriorMixEncoderStage}


@wrapper(Stage.VAE_DECODER)
class VaeDecoderStage(_LatentStats):
    def __init__(self, vae: nn.Module, flow: MMAudioFlow):
        super().__init__(flow)
        self.vae = vae

    @classmethod
    def from_components(cls, components: Components, geometry: Geometry) -> nn.Module:
        return cls(components.vae, components.flow)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        z = latent * self.latent_std + self.latent_mean
        return self.vae.decode(z.transpose(1, 2))


@wrapper(Stage.VOCODER)
class VocoderStage(_NetworkCall):
    component = "vocoder"


@wrapper(Stage.CONDITIONER)
class ConditionerStage(nn.Module):
    """Step-invariant conditioning of one CFG branch.

    The runtime runs it on the query features for the conditional branch, and once per model load
    on the learned empty features (or once per request with a negative text) for the
    unconditional branch, which the denoiser takes stacked second.
    """

    def __init__(self, flow: MMAudioFlow):
        super().__init__()
        self.flow = flow

    @classmethod
    def from_components(cls, components: Components, geometry: Geometry) -> nn.Module:
        return cls(components.flow)

    def forward(self, clip_features, sync_features, text_features):
        return tuple(self.flow.prepare_conditions(clip_features, sync_features, text_features))


@wrapper(Stage.DENOISER)
class DenoiserStage(nn.Module):
    """One Euler step x <- x + dt * (cfg * v_cond + (1 - cfg) * v_uncond), one network call.

    Both CFG branches run as one batch of 2B; both see the same mixture latent.
    """

    def __init__(self, flow: MMAudioFlow):
        super().__init__()
        self.flow = flow

    @classmethod
    def from_components(cls, components: Components, geometry: Geometry) -> nn.Module:
        """The separation denoiser (with a mixture input) or the generation-only one."""
        denoiser = DenoiserStage if geometry.separation else GenerationDenoiserStage
        return denoiser(components.flow)

    def step(self, x, mix_latent, t, dt, cfg, conditioning: Conditions):
        mix = None if mix_latent is None else torch.cat([mix_latent, mix_latent], dim=0)
        v = self.flow.velocity(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), conditioning,
                               mix)
        v_cond, v_uncond = v.unflatten(0, (2, -1)).unbind(0)  # chunk() specialises the batch
        cfg = cfg[:, None, None]
        return guided_euler_step(x, dt[:, None, None], cfg, v_cond, v_uncond)

    def forward(self, x, mix_latent, t, dt, cfg, cond_clip, cond_sync, cond_text, cond_global_c):
        return self.step(x, mix_latent, t, dt, cfg,
                         Conditions(cond_clip, cond_sync, cond_text, cond_global_c))


class GenerationDenoiserStage(DenoiserStage):
    """The denoiser of a generation-only network (no mixture input)."""

    def forward(self, x, t, dt, cfg, cond_clip, cond_sync, cond_text, cond_global_c):
        return self.step(x, None, t, dt, cfg,
                         Conditions(cond_clip, cond_sync, cond_text, cond_global_c))


def geometry(components: Components, mixture_latent: str = POSTERIOR_SAMPLE) -> Geometry:
    """Stage geometry of a set of components, read off the networks themselves, with the mixture
    latent convention chosen at export (recorded for separation models only)."""
    flow = components.flow
    c = flow.config
    lengths = c.lengths
    conditioning = (("clip", (c.clip_seq_len, c.hidden_dim)),
                    ("sync", (c.latent_seq_len, c.hidden_dim)),
                    ("text", (c.text_seq_len, c.hidden_dim)),
                    ("global_c", (c.hidden_dim,)))
    assert tuple(name for name, _ in conditioning) == Conditions._fields
    return Geometry(
        sample_rate=c.sample_rate, window_samples=lengths.audio_samples,
        window_seconds=float(c.duration),
        latent_len=c.latent_seq_len, latent_dim=c.latent_dim, n_mels=c.audio_mode.n_mels,
        mel_frames=lengths.mel_frames, clip_len=c.clip_seq_len, clip_dim=c.clip_dim,
        clip_image_size=CLIP_IMAGE_SIZE, sync_fps=float(SYNC_FPS),
        sync_segments=lengths.sync_segments, sync_tokens_per_segment=SYNC_TOKENS_PER_SEGMENT,
        sync_frames_per_segment=SYNC_SEGMENT_FRAMES, sync_segment_stride=SYNC_SEGMENT_STRIDE,
        sync_dim=c.sync_dim,
        sync_image_size=SYNC_IMAGE_SIZE, text_len=c.text_seq_len, text_dim=c.text_dim,
        separation=c.separation, conditioning=conditioning,
        mixture_latent=mixture_latent if c.separation else None)


def build_stage_modules(components: Components, g: Geometry) -> dict[str, nn.Module]:
    """One export module per stage a model of geometry ``g`` has, in pipeline order."""
    return {name: WRAPPERS[name].from_components(components, g)
            for name in stage_names(g.separation)}


def stage_modules(components: Components,
                  mixture_latent: str = POSTERIOR_SAMPLE) -> dict[str, nn.Module]:
    return build_stage_modules(components, geometry(components, mixture_latent))


def stage_specs(components: Components, *, max_batch: int = 4,
                mixture_latent: str = POSTERIOR_SAMPLE) -> dict[str, StageSpec]:
    return build_stage_specs(geometry(components, mixture_latent), max_batch=max_batch)
