"""Declarative contracts of the exported stage graphs.

Every fact about a stage is declared once, in ``STAGES`` (pipeline order): its name, which kinds
of model have it, a description, its inputs and outputs (dtype and a shape in terms of the
``Geometry``), the batch rule of its optimisation profile and its parity tolerances.
``build_stage_specs`` turns the declarations and one model's geometry into StageSpecs; the
exporter, the TensorRT profile builder, the manifest and the runtime's checks all read these, and
the manifest carries a JSON copy (with the geometry) so a model directory describes itself.
Torch-free on purpose.

A dimension is an int (fixed per window) or a symbol: ``"batch"`` or ``"<k>*batch"``. Each stage
has one dynamic axis (the first) whose size is a multiple of the stage's batch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

Dim = int | str

# How the mix_encoder turns a mixture window into the latent the denoiser reads (README,
# "Separating"). POSTERIOR_SAMPLE is the authors' evaluation (sony/mmaudiosep separate(),
# batch_eval.py): the VAE posterior sample mean + std * noise, not normalised; the graph takes the
# standard-normal noise as an input. NORMALIZED_MEAN is the posterior mean normalised with the
# flow network's latent statistics.
POSTERIOR_SAMPLE = "posterior-sample"
NORMALIZED_MEAN = "normalized-mean"
MIXTURE_LATENTS = (POSTERIOR_SAMPLE, NORMALIZED_MEAN)
# Generation mode with a separation model (the authors' generate()): the mixture is white-noise
# audio of one window, GENERATION_NOISE_SCALE * standard normal, encoded like a real mixture.
GENERATION_NOISE_SCALE = 0.9
_SYMBOL = re.compile(r"^(?:(\d+)\*)?batch$")


class Stage:
    """Stage names (their pipeline order is that of ``STAGES``)."""

    CLIP_IMAGE = "clip_image"
    CLIP_TEXT = "clip_text"
    SYNC = "sync"
    MIX_ENCODER = "mix_encoder"
    CONDITIONER = "conditioner"
    DENOISER = "denoiser"
    VAE_DECODER = "vae_decoder"
    VOCODER = "vocoder"


class Tensor:
    """Names of the stage graphs' inputs and outputs. The conditioner's outputs (the denoiser's
    conditioning inputs) are named from the geometry's conditioning: ``Tensor.conditioning``."""

    FRAMES = "frames"
    CLIP_FEATURES = "clip_features"
    TOKENS = "tokens"
    TEXT_FEATURES = "text_features"
    SEGMENTS = "segments"
    SYNC_FEATURES = "sync_features"
    WAVEFORM = "waveform"
    NOISE = "noise"
    MIX_LATENT = "mix_latent"
    X = "x"
    T = "t"
    DT = "dt"
    CFG = "cfg"
    X_NEXT = "x_next"
    LATENT = "latent"
    MEL = "mel"

    @staticmethod
    def conditioning(name: str) -> str:
        return f"cond_{name}"


def euler_schedule(steps: int) -> tuple[list[float], float]:
    """The sampling schedule: Euler from t=0 to 1 in ``steps`` equal steps; returns the step
    start times ``i / steps`` and the step size ``1 / steps``."""
    return [i / steps for i in range(steps)], 1.0 / steps


def guidance_strength(cfg: float) -> float:
    """The strength the guided step uses for a requested ``cfg``: the authors' sampler takes the
    conditional velocity alone below 1 (sony/mmaudiosep, MMAudio ``ode_wrapper``), which is the
    guided formula at strength 1."""
    return max(float(cfg), 1.0)


def dim_size(dim: Dim, batch: int) -> int:
    """Concrete size of ``dim`` at ``batch``."""
    if isinstance(dim, int):
        return dim
    match = _SYMBOL.match(dim)
    if match is None:
        raise ValueError(f"bad dimension symbol {dim!r}")
    return int(match.group(1) or 1) * batch


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: tuple[Dim, ...]

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(dim_size(d, batch) for d in self.shape)

    @property
    def batch_multiple(self) -> int:
        dim = self.shape[0]
        return dim if isinstance(dim, int) else dim_size(dim, 1)


@dataclass(frozen=True)
class StageSpec:
    name: str
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 4
    # relative L2 bounds against the PyTorch fp32 module (DESIGN.md, "Numerics")
    onnx_tolerance: float = 1e-4
    reduced_precision_tolerance: float = 1e-2

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def tensor(self, name: str) -> TensorSpec:
        for t in (*self.inputs, *self.outputs):
            if t.name == name:
                return t
        raise KeyError(f"stage {self.name!r} has no tensor {name!r}")

    def to_json(self) -> dict:
        data = asdict(self)
        for group in ("inputs", "outputs"):
            data[group] = [{**t, "shape": list(t["shape"])} for t in data[group]]
        return data

    @classmethod
    def from_json(cls, data: dict) -> StageSpec:
        def tensors(items):
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)

        return cls(**{**data, "inputs": tensors(data["inputs"]),
                      "outputs": tensors(data["outputs"])})


@dataclass(frozen=True)
class Geometry:
    """Everything the stage shapes and the video preprocessing depend on; written by the exporter
    from the networks into the manifest's ``geometry``, read back by the runtime (``from_json``)."""

    sample_rate: int
    window_samples: int
    window_seconds: float
    latent_len: int
    latent_dim: int
    n_mels: int
    mel_frames: int
    clip_len: int
    clip_dim: int
    clip_image_size: int
    sync_fps: float  # Synchformer's frame rate
    sync_segments: int
    sync_tokens_per_segment: int
    sync_frames_per_segment: int
    sync_segment_stride: int  # frames between segment starts (segments overlap)
    sync_dim: int
    sync_image_size: int
    text_len: int
    text_dim: int
    separation: bool
    # step-invariant conditioning produced by the conditioner: name -> per-item shape
    conditioning: tuple[tuple[str, tuple[int, ...]], ...]
    # one of MIXTURE_LATENTS for a separation model; None for a generation-only one
    mixture_latent: str | None = None

    @property
    def clip_fps(self) -> float:
        return self.clip_len / self.window_seconds

    @property
    def sync_frames(self) -> int:
        """Sync-rate frames of one window (consecutive segments overlap)."""
        return (self.sync_segments - 1) * self.sync_segment_stride + self.sync_frames_per_segment

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["conditioning"] = [[name, list(shape)] for name, shape in self.conditioning]
        return data

    @classmethod
    def from_json(cls, data: dict) -> Geometry:
        """The manifest's geometry; KeyError / TypeError / ValueError when incomplete."""
        values = {f.name: data[f.name] for f in fields(cls) if f.name != "mixture_latent"}
        values["conditioning"] = tuple((str(name), tuple(int(n) for n in shape))
                                       for name, shape in data["conditioning"])
        return cls(**values, mixture_latent=data.get("mixture_latent"))


# -- the stage declarations ------------------------------------------------------------------
F32, I64 = "float32", "int64"
Tensors = tuple[TensorSpec, ...]


def _latent(g: Geometry, name: str) -> TensorSpec:
    return TensorSpec(name, F32, ("batch", g.latent_len, g.latent_dim))


def _mel(g: Geometry) -> TensorSpec:
    return TensorSpec(Tensor.MEL, F32, ("batch", g.n_mels, g.mel_frames))


def _waveform(g: Geometry) -> TensorSpec:
    return TensorSpec(Tensor.WAVEFORM, F32, ("batch", g.window_samples))


def _conditioning(g: Geometry, batch: str) -> Tensors:
    return tuple(TensorSpec(Tensor.conditioning(name), F32, (batch, *shape))
                 for name, shape in g.conditioning)


def _clip_image(g: Geometry) -> tuple[Tensors, Tensors]:
    size = g.clip_image_size
    return ((TensorSpec(Tensor.FRAMES, F32, ("batch", 3, size, size)),),
            (TensorSpec(Tensor.CLIP_FEATURES, F32, ("batch", g.clip_dim)),))


def _clip_text(g: Geometry) -> tuple[Tensors, Tensors]:
    return ((TensorSpec(Tensor.TOKENS, I64, ("batch", g.text_len)),),
            (TensorSpec(Tensor.TEXT_FEATURES, F32, ("batch", g.text_len, g.text_dim)),))


def _sync(g: Geometry) -> tuple[Tensors, Tensors]:
    size = g.sync_image_size
    segment = ("batch", g.sync_frames_per_segment, 3, size, size)
    return ((TensorSpec(Tensor.SEGMENTS, F32, segment),),
            (TensorSpec(Tensor.SYNC_FEATURES, F32,
                        ("batch", g.sync_tokens_per_segment, g.sync_dim)),))


def _mix_encoder(g: Geometry) -> tuple[Tensors, Tensors]:
    noise = (_latent(g, Tensor.NOISE),) if g.mixture_latent == POSTERIOR_SAMPLE else ()
    return (_waveform(g), *noise), (_latent(g, Tensor.MIX_LATENT),)


def _conditioner(g: Geometry) -> tuple[Tensors, Tensors]:
    sync_tokens = g.sync_segments * g.sync_tokens_per_segment
    return ((TensorSpec(Tensor.CLIP_FEATURES, F32, ("batch", g.clip_len, g.clip_dim)),
             TensorSpec(Tensor.SYNC_FEATURES, F32, ("batch", sync_tokens, g.sync_dim)),
             TensorSpec(Tensor.TEXT_FEATURES, F32, ("batch", g.text_len, g.text_dim))),
            _conditioning(g, "batch"))


def _denoiser(g: Geometry) -> tuple[Tensors, Tensors]:
    mix = (_latent(g, Tensor.MIX_LATENT),) if g.separation else ()
    per_item = tuple(TensorSpec(name, F32, ("batch",))
                     for name in (Tensor.T, Tensor.DT, Tensor.CFG))
    # both CFG branches stacked [conditional; unconditional] on one axis
    return ((_latent(g, Tensor.X), *mix, *per_item, *_conditioning(g, "2*batch")),
            (_latent(g, Tensor.X_NEXT),))


def _vae_decoder(g: Geometry) -> tuple[Tensors, Tensors]:
    return (_latent(g, Tensor.LATENT),), (_mel(g),)


def _vocoder(g: Geometry) -> tuple[Tensors, Tensors]:
    return (_mel(g),), (_waveform(g),)


# Batch rules of the optimisation profiles: (geometry, max windows) -> opt and max batch.
def per_window(g: Geometry, max_batch: int) -> dict:
    return dict(max_batch=max_batch, opt_batch=min(2, max_batch))


def per_frame(g: Geometry, max_batch: int) -> dict:
    """The CLIP image encoder batches frames, sized for ``max_batch`` windows."""
    return dict(max_batch=g.clip_len * max_batch, opt_batch=g.clip_len)


def per_segment(g: Geometry, max_batch: int) -> dict:
    """Synchformer batches 16-frame segments, sized for ``max_batch`` windows."""
    return dict(max_batch=g.sync_segments * max_batch, opt_batch=g.sync_segments)


@dataclass(frozen=True)
class StageDeclaration:
    """One stage: ``tensors(geometry)`` gives its (inputs, outputs); ``describe(geometry)`` its
    description; ``profile`` its batch rule; ``separation_only`` whether only separation models
    have it."""

    name: str
    describe: Callable[[Geometry], str]
    tensors: Callable[[Geometry], tuple[Tensors, Tensors]]
    profile: Callable[[Geometry, int], dict] = per_window
    separation_only: bool = False
    onnx_tolerance: float = 1e-4
    reduced_precision_tolerance: float = 1e-2

    def present(self, separation: bool) -> bool:
        return separation or not self.separation_only


def _mix_encoder_description(g: Geometry) -> str:
    if g.mixture_latent == POSTERIOR_SAMPLE:
        return "mixture waveform -> mel -> VAE posterior -> mean + std * noise (not normalised)"
    return "mixture waveform -> mel -> VAE posterior mean -> normalised"


def _fixed(text: str) -> Callable[[Geometry], str]:
    return lambda g: text


# The pipeline, in order (the manifest's ``stage_order``).
STAGES: tuple[StageDeclaration, ...] = (
    StageDeclaration(Stage.CLIP_IMAGE,
                     _fixed("RGB frames in [0,1] -> L2-normalised CLIP image embeddings"),
                     _clip_image, per_frame),
    StageDeclaration(Stage.CLIP_TEXT,
                     _fixed("token ids -> per-token normalised CLIP text hidden states"),
                     _clip_text),
    StageDeclaration(Stage.SYNC,
                     _fixed("16-frame segments in [-1,1] -> Synchformer features (8 per segment)"),
                     _sync, per_segment),
    StageDeclaration(Stage.MIX_ENCODER, _mix_encoder_description, _mix_encoder,
                     separation_only=True),  # a generation-only model has no mixture to encode
    StageDeclaration(Stage.CONDITIONER,
                     _fixed("clip/sync/text features -> step-invariant conditioning of one CFG "
                            "branch (the runtime computes the unconditional branch once and "
                            "stacks it second)"),
                     _conditioner),
    StageDeclaration(Stage.DENOISER,
                     _fixed("one Euler step with classifier-free guidance, both branches batched"),
                     _denoiser),
    StageDeclaration(Stage.VAE_DECODER,
                     _fixed("normalised latent -> un-normalise -> VAE decoder -> log-mel"),
                     _vae_decoder),
    StageDeclaration(Stage.VOCODER,
                     lambda g: "log-mel -> waveform (BigVGAN "
                               f"{'v1' if g.sample_rate == 16000 else 'v2'})",
                     _vocoder),
)
STAGE_ORDER = tuple(s.name for s in STAGES)


def stage_names(separation: bool) -> tuple[str, ...]:
    """The stages a model of this kind has, in pipeline order."""
    return tuple(s.name for s in STAGES if s.present(separation))


def build_stage_specs(g: Geometry, *, max_batch: int = 4) -> dict[str, StageSpec]:
    """The stage contracts of one model geometry, in pipeline order (DESIGN.md, "Stages and their
    graphs")."""
    if g.separation and g.mixture_latent not in MIXTURE_LATENTS:
        raise ValueError(f"mixture latent convention {g.mixture_latent!r}; expected one of "
                         f"{', '.join(MIXTURE_LATENTS)}")
    specs = {}
    for stage in STAGES:
        if stage.present(g.separation):
            inputs, outputs = stage.tensors(g)
            specs[stage.name] = StageSpec(
                stage.name, stage.describe(g), inputs, outputs, **stage.profile(g, max_batch),
                onnx_tolerance=stage.onnx_tolerance,
                reduced_precision_tolerance=stage.reduced_precision_tolerance)
    return specs
