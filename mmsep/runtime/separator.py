"""``Separator``: a model directory + a backend -> separated (or generated) audio.

One request = one mixture (or none), an optional video and one or more text queries. It is cut
into windows (``windows.py``); every (window, text) pair is one batch item, ordered window-major:
item ``w * n_texts + k`` is window ``w`` with text ``k``. Items run in batches of at most
``max_batch``. Every random number of a request comes from ``rng = numpy.random.default_rng(seed)``
in this order (``mmsep.models.sampler.initial_noise`` reproduces it): first the initial noise of
all items, ``x0 = rng.standard_normal((items, N, C), dtype=float32)``; then, per window in window
order as the windows are encoded, what that window needs. In generation mode with a separation
model (no mixture at all) the window's mixture is white noise,
``GENERATION_NOISE_SCALE * rng.standard_normal(window_samples, dtype=float32)``, encoded like a real
mixture; under the ``posterior-sample`` convention the mix encoder's noise follows,
``rng.standard_normal((N, C), dtype=float32)``. The convention is the manifest's.

Conditions: a window with video uses its CLIP and Synchformer features, without video the learned
empty ones (both); no text means the learned empty text features. The unconditional branch uses the
learned empty CLIP/Synchformer features and the negative text's features, or the empty text
features when there is no negative text. It is the same for every item of a request: its
conditioning is computed once when the model loads (and once per distinct negative text, cached)
and stacked after the conditional branch for the denoiser.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..closing import Closing
from ..stages import POSTERIOR_SAMPLE, Stage, Tensor, guidance_strength
from . import audio as audio_io
from .backends import create_backend
from .errors import InputError
from .many import run_requests
from .media_tracks import audio_track_start
from .model_dir import ModelDir
from .prefetch import PrefetchedWindows
from .requests import NUMBER, BatchInputs, SeparationResult, Timings, is_integer
from .tokenizer import CONTEXT_LENGTH
from .video import VideoSource, WindowFrames
from .windows import WindowPlan

_TEXT_CACHE_SIZE = 256
_NEGATIVE_CACHE_SIZE = 16


class Separator(Closing):
    """Loads a model directory once (sessions, tokenizer, empty features) and serves requests.

    ``backend``: "auto" (the first that can run here of TensorRT, ONNX Runtime CUDA and ONNX
    Runtime CPU), "trt", "ort-cuda" or "ort-cpu"; ``backend_name`` tells which one runs.
    ``max_batch`` bounds the items per batch (default: the manifest's), ``overlap`` is the window
    overlap in seconds (default: the manifest's, 1 s). ``threads`` sets ONNX Runtime's intra-op
    threads (0: its default); ``precision`` its graphs ("auto": fp16 on CUDA, fp32 on the CPU;
    backends/factory.py). ``verify=False`` skips hashing the model's files at start (their sizes
    are still checked; a file that then fails to load is hashed and reported), as
    ``mmsep-run --no-verify``. One request runs at a time: threads sharing a Separator take
    turns (its caches and device buffers are not guarded), or each holds its own.
    """

    def __init__(self, model_dir: str | os.PathLike = "models/tiny", backend: str = "auto", *,
                 max_batch: int | None = None, overlap: float | None = None, threads: int = 0,
                 precision: str = "auto", verify: bool = True):
        _check_arguments(model_dir, max_batch, overlap, threads, verify)
        self._closed = False
        self.model = ModelDir(model_dir, verify=verify)
        self.info = info = self.model.info
        self.max_batch = info.max_batch if max_batch is None else int(max_batch)
        self.overlap = info.default_overlap_seconds if overlap is None else float(overlap)
        limit = info.window_seconds / 2
        if not 0.0 <= self.overlap <= limit:
            raise InputError(f"overlap must be between 0 and {limit:g} s (half a window), "
                             f"got {overlap!r}")
        self._empty = self.model.empty_features()
        self._tokenizer = self.model.tokenizer()
        self._texts: OrderedDict[str, np.ndarray] = OrderedDict()
        self.backend = create_backend(self.model, backend, threads=threads, precision=precision)
        self.backend_name = self.backend.name
        self._uncond: OrderedDict[str | None, dict[str, np.ndarray]] = OrderedDict()
        try:
            limit = self.backend.max_batch  # fixed engine profiles; None when unbounded
            if limit is not None and self.max_batch > limit:
                raise InputError(f"max batch {self.max_batch} exceeds what the "
                                 f"{self.backend_name} engines were built for ({limit}); lower "
                                 "it or rebuild the engines with a larger --max-batch")
            self._resizer = self.backend.frame_resizer(info.clip_image_size,  # on the device
                                                       info.sync_image_size)
            self._unconditional(None)
        except BaseException:
            self.backend.close()  # GPU sessions and buffers are not left to the collector
            raise

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        self._closed = True
        self.backend.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Separator is closed; create a new one")

    @property
    def sample_rate(self) -> int:
        return self.info.sample_rate

    # -- public API ----------------------------------------------------------------------------
    def separate(self, mix=None, video=None, text: str | Sequence[str] | None = None,
                 negative_text: str | None = None, steps: int | None = None,
                 cfg: float | None = None, seed: int = 0, **options) -> np.ndarray:
        """Separated audio, float32 at ``sample_rate``: (length,) for one text (or none),
        (n_texts, length) when ``text`` is a list (one stem per text, all in one batch).

        ``mix``: path of an audio/media file, or samples at ``sample_rate`` ((L,) or
        (L, channels), float in [-1, 1]). ``video``: path, or uint8 RGB frames (T, H, W, 3) with
        ``video_fps=``. With video and no mix the video's audio track is the mixture; with no
        mixture at all (or ``generate=True``) the model generates from a noise mixture, for
        ``duration=`` seconds (default: the video's length, else one window). Other options are
        those of ``process``.
        """
        if "sink" in options:
            raise TypeError("separate() returns the audio; use process(sink=...) to stream it")
        result = self.process(mix=mix, video=video, text=text, negative_text=negative_text,
                              steps=steps, cfg=cfg, seed=seed, **options)
        return result.audio if isinstance(text, (list, tuple)) else result.audio[0]

    def process(self, mix=None, video=None, text: str | Sequence[str] | None = None,
                negative_text: str | None = None, steps: int | None = None,
                cfg: float | None = None, seed: int = 0, *, video_fps: float | None = None,
                generate: bool = False, duration: float | None = None,
                keep_latents: bool = False,
                progress: Callable[[int, int], None] | None = None,
                sink: Callable[[int, np.ndarray], None] | None = None) -> SeparationResult:
        """Run one request; returns audio (n_texts, length) with timings and counts.

        ``progress(done, total)`` is called after each batch. ``keep_latents`` keeps the final
        latents of every item (window-major) in the result, for checks against a reference.
        ``sink(k, samples)``: hand the output over as it is produced instead of collecting it;
        it is called in order with each run of finalised samples of text ``k`` (float32, not
        clipped) as the windows are joined, and the result's ``audio`` is then None. A mixture
        file is read in blocks, never whole, so with a sink memory does not grow with length.
        It is the one-request case of ``process_many`` (``many.py``), failures raised.
        """
        self._check_open()
        request = dict(mix=mix, video=video, text=text, negative_text=negative_text,
                       steps=steps, cfg=cfg, seed=seed, video_fps=video_fps, generate=generate,
                       duration=duration, keep_latents=keep_latents, sink=sink)
        [result] = run_requests(self, [request], progress=progress)
        if isinstance(result, BaseException):
            raise result
        return result

    def text_features(self, text: str | None) -> np.ndarray:
        """CLIP text features (77, Dt) of ``text`` (cached), or the learned empty ones for None."""
        return self._text_batch([text])[0]

    def _unconditional(self, negative_text: str | None) -> dict[str, np.ndarray]:
        """Unconditional-branch conditioning (batch 1): learned empty video features with the
        negative text's features, or with the empty text features for None (kept for the life
        of the Separator; negative texts in a small LRU cache)."""
        cached = self._uncond.get(negative_text)
        if cached is None:
            empty = self._empty
            cached = self.backend.run(Stage.CONDITIONER, {
                Tensor.CLIP_FEATURES: empty[Tensor.CLIP_FEATURES][None],
                Tensor.SYNC_FEATURES: empty[Tensor.SYNC_FEATURES][None],
                Tensor.TEXT_FEATURES: self.text_features(negative_text)[None]})
            self._uncond[negative_text] = cached
            while len(self._uncond) > _NEGATIVE_CACHE_SIZE:
                oldest = next(k for k in self._uncond if k is not None)
                del self._uncond[oldest]
        self._uncond.move_to_end(negative_text)
        return cached

    def _text_batch(self, texts: list[str | None]) -> list[np.ndarray]:
        missing = list(dict.fromkeys(t for t in texts if t is not None and t not in self._texts))
        for text in missing:
            _warn_if_cut(text, self._tokenizer.length(text))
        for chunk in range(0, len(missing), self.max_batch):
            group = missing[chunk:chunk + self.max_batch]
            features = self.backend.run(Stage.CLIP_TEXT, {Tensor.TOKENS: self._tokenizer(group)})
            for t, f in zip(group, features[Tensor.TEXT_FEATURES]):
                self._texts[t] = f
        out = []
        for t in texts:
            if t is None:
                out.append(self._empty[Tensor.TEXT_FEATURES])
            else:
                self._texts.move_to_end(t)
                out.append(self._texts[t])
        while len(self._texts) > max(_TEXT_CACHE_SIZE, len(texts)):
            self._texts.popitem(last=False)
        return out

    # -- inputs --------------------------------------------------------------------------------
    def _video_source(self, video, fps) -> VideoSource | None:
        if fps is not None and (video is None or isinstance(video, (str, os.PathLike))):
            raise InputError("video_fps is the frame rate of a video given as a frame array; "
                             "a file's own rate is used")
        if video is None:
            return None
        if isinstance(video, (str, os.PathLike)):
            return VideoSource(video)
        return VideoSource.from_array(video, fps)

    def _mixture(self, mix, source: VideoSource | None, generate: bool):
        """The checked mixture (``audio.ArrayMixture`` or, for files, ``audio.MixtureStream``),
        or None for generation."""
        sr = self.info.sample_rate
        if generate:
            if mix is not None:
                raise InputError("a mixture was given together with generate; drop one of them")
            return None
        if not self.info.separation:
            if mix is not None:
                raise InputError(f"{self.model.path}: a generation-only model takes no mixture")
            return None
        if mix is not None:
            if isinstance(mix, (str, os.PathLike)):
                mixture = audio_io.MixtureStream(mix, sr)
            else:
                mixture = audio_io.ArrayMixture(np.asarray(mix), sr)
        elif source is not None:
            if source.path is None or not source.has_audio:
                raise InputError(f"{source.name}: no mixture given and the video has no audio "
                                 "track to separate; give a mixture (mix, --mix), or generate "
                                 "audio for the video (generate, --generate)")
            mixture = audio_io.MixtureStream(source.path, sr, media=True,
                                             name=f"{source.name} (audio track)")
        else:
            return None  # nothing to separate: generation mode
        mixture.check()
        return mixture

    @staticmethod
    def _time_origin(source: VideoSource | None, mix, mixture) -> float:
        """Where the output begins in the video's own time line: the first sample of its audio
        track when that track is the mixture (no mix, or a mix naming the video file itself),
        else the start of its video stream."""
        if source is None or source.path is None:
            return 0.0
        if mixture is not None and (mix is None or _same_file(mix, source.path)):
            return audio_track_start(source.path)
        return source.start

    def _video_windows(self, source: VideoSource, plan: WindowPlan,
                       origin: float = 0.0) -> WindowFrames:
        """The per-window model inputs of ``source`` for the windows of ``plan``, the output
        beginning at ``origin`` in the video's time line."""
        return WindowFrames(source, plan.start_seconds, self.info.geometry,
                            resizer=self._resizer, end=plan.length / plan.sample_rate,
                            origin=origin)

    # -- stages --------------------------------------------------------------------------------
    def _window_features(self, frames: PrefetchedWindows | None,
                         timings: Timings) -> dict[str, np.ndarray]:
        if frames is None:
            return {Tensor.CLIP_FEATURES: self._empty[Tensor.CLIP_FEATURES],
                    Tensor.SYNC_FEATURES: self._empty[Tensor.SYNC_FEATURES]}
        clip_in, segments = frames.next_window()  # its time: frames.work_s / wait_s
        with timings.measure("features"):
            clip = self.backend.run(Stage.CLIP_IMAGE,
                                    {Tensor.FRAMES: clip_in})[Tensor.CLIP_FEATURES]
            sync = self.backend.run(Stage.SYNC,
                                    {Tensor.SEGMENTS: segments})[Tensor.SYNC_FEATURES]
        return {Tensor.CLIP_FEATURES: clip,
                Tensor.SYNC_FEATURES: sync.reshape(-1, sync.shape[-1])}

    def _encode_windows(self, cuts, rng, new: list[int], windows, timings: Timings) -> None:
        """Mixture latents of the ``new`` windows; ``cuts`` yields (w, samples) in window order
        and is read (decoding the file as far as needed) only here. Each window's posterior
        noise is drawn from ``rng`` right after its samples (see the module docstring)."""
        posterior = self.info.mixture_latent == POSTERIOR_SAMPLE
        for chunk in range(0, len(new), self.max_batch):
            ws = new[chunk:chunk + self.max_batch]
            with timings.measure("decode"):
                wave, noise = [], []
                for w in ws:
                    got, samples = next(cuts)
                    assert got == w, f"mixture window {got} read for window {w}"
                    wave.append(samples)
                    if posterior:
                        noise.append(rng.standard_normal(self.info.latent_shape,
                                                         dtype=np.float32))
                inputs = {Tensor.WAVEFORM: np.stack(wave)}
                if posterior:
                    inputs[Tensor.NOISE] = np.stack(noise)
            with timings.measure("mix_encode"):
                latent = self.backend.run(Stage.MIX_ENCODER, inputs)[Tensor.MIX_LATENT]
                for w, lat in zip(ws, latent):
                    windows[w][Tensor.MIX_LATENT] = lat

    def _run_batch(self, batch: BatchInputs, timings: Timings) -> tuple[np.ndarray, Any]:
        """One batch through conditioner, denoiser, VAE decoder and vocoder: (waveforms, final
        latents as the backend's device value; ``backend.to_host`` copies them)."""
        backend = self.backend
        with timings.measure("conditioning"):
            inputs = {name: np.stack([w[name] for w in batch.windows])
                      for name in (Tensor.CLIP_FEATURES, Tensor.SYNC_FEATURES)}
            inputs[Tensor.TEXT_FEATURES] = np.stack(batch.text_features)
            conditioning = backend.condition(inputs, batch.unconditional)
        with timings.measure("sampling"):
            mix_latent = (np.stack([w[Tensor.MIX_LATENT] for w in batch.windows])
                          if self.info.separation else None)
            x1 = backend.sample(batch.x0, mix_latent, conditioning, batch.steps,
                                guidance_strength(batch.cfg))
        with timings.measure("vae_decode"):
            mel = backend.run(Stage.VAE_DECODER, {Tensor.LATENT: x1}, on_device=True)[Tensor.MEL]
        with timings.measure("vocode"):
            audio = backend.run(Stage.VOCODER, {Tensor.MEL: mel})[Tensor.WAVEFORM]
        return audio, x1

    def process_many(self, requests: Sequence[dict]) -> list:
        """Run several requests at once, their (window, text) items sharing batches; each
        request is a dict of ``process`` keyword arguments (mix, video, text, negative_text,
        steps, cfg, seed, video_fps, generate, duration, keep_latents, sink). Returns, in order,
        a ``SeparationResult`` (the same audio as ``process`` with that seed, up to float rounding
        at another batch size) or the exception that request failed with; one request's failure
        does not stop the others (``many.py``)."""
        self._check_open()
        if isinstance(requests, (str, bytes, Mapping)) or not isinstance(requests, Sequence):
            raise TypeError(f"requests must be a list of dicts of process() options, got "
                            f"{type(requests).__name__}")
        return run_requests(self, requests)


def _same_file(mix, path: os.PathLike) -> bool:
    """Whether ``mix`` is a path naming the file ``path`` (links and spellings included)."""
    if not isinstance(mix, (str, os.PathLike)):
        return False
    try:
        return os.path.samefile(mix, path)
    except OSError:
        return False


def _warn_if_cut(text: str, tokens: int) -> None:
    if tokens > CONTEXT_LENGTH:
        shown = text if len(text) <= 40 else f"{text[:40]}..."
        warnings.warn(f"text {shown!r} takes {tokens} CLIP tokens; the model reads "
                      f"{CONTEXT_LENGTH} (start, the first {CONTEXT_LENGTH - 2}, end) and ignores "
                      "the rest", stacklevel=4)


def _check_arguments(model_dir, max_batch, overlap, threads, verify) -> None:
    """InputError for arguments of the wrong kind, before anything is loaded (ONNX Runtime
    would otherwise blame the model file for a bad thread count)."""
    if not isinstance(model_dir, (str, os.PathLike)):
        raise InputError(f"model_dir must be a path, got {type(model_dir).__name__}")
    if max_batch is not None and (not is_integer(max_batch) or max_batch < 1):
        raise InputError(f"max_batch must be a positive integer, got {max_batch!r}")
    if not isinstance(verify, (bool, np.bool_)):
        raise InputError(f"verify must be True or False, got {verify!r}")
    if overlap is not None and (isinstance(overlap, bool) or
                                not isinstance(overlap, NUMBER)):
        raise InputError(f"overlap must be a number of seconds, got {overlap!r}")
    if not is_integer(threads) or threads < 0:
        raise InputError(f"threads must be a non-negative integer, got {threads!r}")
