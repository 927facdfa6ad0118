"""Declarative contracts of the exported stage graphs.

One StageSpec per graph: names, dtypes and shapes of its inputs and outputs, the batch range of its
optimisation profile and its parity tolerance. The exporter, the TensorRT profile builder, the
manifest and the runtime's buffer allocation all read these; the manifest carries a JSON copy so a
model directory describes itself. Torch-free on purpose.

A dimension is an int (fixed per window) or a symbol: ``"batch"`` or ``"<k>*batch"``. Each stage
has one dynamic axis (the first) whose size is a multiple of the stage's batch.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

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
    """Stage names, in pipeline order (the manifest's ``stage_order``)."""

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
    extra: dict = field(default_factory=dict, compare=False)

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

        return cls(**{**data, "inputs": tensors(data["inputs"]), "outputs": tensors(data["outputs"])})


@dataclass(frozen=True)
class Geometry:
    """Everything the stage shapes depend on; written by the exporter from the networks."""

    sample_rate: int
    window_samples: int
    latent_len: int
    latent_dim: int
    n_mels: int
    mel_frames: int
    clip_len: int
    clip_dim: int
    clip_image_size: int
    sync_segments: int
    sync_tokens_per_segment: int
    sync_frames_per_segment: int
    sync_dim: int
    sync_image_size: int
    text_len: int
    text_dim: int
    separation: bool
    # step-invariant conditioning produced by the conditioner: name -> per-item shape
    conditioning: tuple[tuple[str, tuple[int, ...]], ...]
    # one of MIXTURE_LATENTS for a separation model; None for a generation-only one
    mixture_latent: str | None = None


STAGE_ORDER = ("clip_image", "clip_text", "sync", "mix_encoder", "conditioner", "denoiser",
               "vae_decoder", "vocoder")


def build_stage_specs(g: Geometry, *, max_batch: int = 4) -> dict[str, StageSpec]:
    """The eight stage contracts for one model geometry (DESIGN.md, "Stages and their graphs")."""
    f32, i64 = "float32", "int64"
    latent = ("batch", g.latent_len, g.latent_dim)
    if g.separation and g.mixture_latent not in MIXTURE_LATENTS:
        raise ValueError(f"mixture latent convention {g.mixture_latent!r}; expected one of "
                         f"{', '.join(MIXTURE_LATENTS)}")
    posterior = g.mixture_latent == POSTERIOR_SAMPLE
    # The denoiser takes both CFG branches stacked [conditional; unconditional] on one axis.
    one_branch_conditioning = tuple(TensorSpec(f"cond_{name}", f32, ("batch", *shape))
                                    for name, shape in g.conditioning)
    branch_conditioning = tuple(TensorSpec(f"cond_{name}", f32, ("2*batch", *shape))
                                for name, shape in g.conditioning)
    common = dict(max_batch=max_batch, opt_batch=min(2, max_batch))
    # The visual encoders batch frames / segments, not windows: their batch is per image or
    # per 16-frame segment, with profiles sized for max_batch windows.
    per_frame = dict(max_batch=g.clip_len * max_batch, opt_batch=g.clip_len)
    per_segment = dict(max_batch=g.sync_segments * max_batch, opt_batch=g.sync_segments)
    specs = [
        StageSpec("clip_image", "RGB frames in [0,1] -> L2-normalised CLIP image embeddings",
                  (TensorSpec("frames", f32, ("batch", 3, g.clip_image_size, g.clip_image_size)),),
                  (TensorSpec("clip_features", f32, ("batch", g.clip_dim)),), **per_frame),
        StageSpec("clip_text", "token ids -> per-token normalised CLIP text hidden states",
                  (TensorSpec("tokens", i64, ("batch", g.text_len)),),
                  (TensorSpec("text_features", f32, ("batch", g.text_len, g.text_dim)),), **common),
        StageSpec("sync", "16-frame segments in [-1,1] -> Synchformer features (8 per segment)",
                  (TensorSpec("segments", f32, ("batch", g.sync_frames_per_segment, 3,
                                                g.sync_image_size, g.sync_image_size)),),
                  (TensorSpec("sync_features", f32,
                              ("batch", g.sync_tokens_per_segment, g.sync_dim)),), **per_segment),
        StageSpec("mix_encoder",
                  "mixture waveform -> mel -> VAE posterior -> mean + std * noise (not normalised)"
                  if posterior else "mixture waveform -> mel -> VAE posterior mean -> normalised",
                  (TensorSpec("waveform", f32, ("batch", g.window_samples)),
                   *((TensorSpec("noise", f32, latent),) if posterior else ())),
                  (TensorSpec("mix_latent", f32, latent),), **common),
        StageSpec("conditioner",
                  "clip/sync/text features -> step-invariant conditioning of one CFG branch "
                  "(the runtime computes the unconditional branch once and stacks it second)",
                  (TensorSpec("clip_features", f32, ("batch", g.clip_len, g.clip_dim)),
                   TensorSpec("sync_features", f32, ("batch", g.sync_segments * g.sync_tokens_per_segment,
                                                     g.sync_dim)),
                   TensorSpec("text_features", f32, ("batch", g.text_len, g.text_dim))),
                  one_branch_conditioning, **common),
        StageSpec("denoiser", "one Euler step with classifier-free guidance, both branches batched",
                  (TensorSpec("x", f32, latent),
                   *((TensorSpec("mix_latent", f32, latent),) if g.separation else ()),
                   TensorSpec("t", f32, ("batch",)),
                   TensorSpec("dt", f32, ("batch",)),
                   TensorSpec("cfg", f32, ("batch",)),
                   *branch_conditioning),
                  (TensorSpec("x_next", f32, latent),), **common),
        StageSpec("vae_decoder", "normalised latent -> un-normalise -> VAE decoder -> log-mel",
                  (TensorSpec("latent", f32, latent),),
                  (TensorSpec("mel", f32, ("batch", g.n_mels, g.mel_frames)),), **common),
        StageSpec("vocoder", "log-mel -> waveform (BigVGAN "
                  f"{'v1' if g.sample_rate == 16000 else 'v2'})",
                  (TensorSpec("mel", f32, ("batch", g.n_mels, g.mel_frames)),),
                  (TensorSpec("waveform", f32, ("batch", g.window_samples)),), **common),
    ]
    # a generation-only model has no mixture to encode
    return {s.name: s for s in specs if g.separation or s.name != "mix_encoder"}
