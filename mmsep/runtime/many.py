"""The request pipeline behind ``Separator.process`` (one request) and
``Separator.process_many`` (several, their (window, text) items sharing denoiser batches).

Four steps: plan each request's windows and draw its noise (``_open_request``); produce the
inputs of the windows a batch needs, video features and mixture latents (``_produce_inputs``);
run the batch (``_run_batch``); join its waveforms into each request's output
(``_join_outputs``). Every resource a request holds (the video's decoder and prefetch threads,
the mixture file being read) is closed on every exit path, errors included.

Requests share a batch only when they agree on what the denoiser takes once per batch: steps,
cfg and the negative text (the unconditional branch); generation mode's noise mixture is encoded
like a real mixture, so both modes share batches. Each request keeps its own random draws: its
items' ``x0``, then per window its noise mixture (generation mode) and posterior noise, from its
own seed (see ``separator.py``), so what a request computes does not depend on which others it
was batched with (its numbers agree up to float rounding: ONNX Runtime's kernels may round
differently at another batch size). A request that fails (bad media, a bad option) gets its
exception in its place and the others go on; a failing shared batch fails the requests that were
in it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError
from .prefetch import PrefetchedWindows
from .requests import (BatchInputs, SeparationResult, Timings, check_options, noise_mixtures,
                       one_text, request_length, request_texts)
from .windows import CrossfadeJoiner, WindowPlan

if TYPE_CHECKING:
    from .separator import Separator

_OPTIONS = {"mix", "video", "text", "negative_text", "steps", "cfg", "seed", "video_fps",
            "generate", "duration", "keep_latents", "sink"}


@dataclass
class _Settings:
    """A request's checked sampling options."""
    texts: list
    negative_text: str | None
    steps: int
    cfg: float
    seed: int

    @property
    def key(self) -> tuple:
        """What the requests of one batch must agree on."""
        return self.steps, self.cfg, self.negative_text


@dataclass
class _Request:
    """One request's state while its items are in flight."""
    settings: _Settings
    plan: WindowPlan
    length: int
    mode: str  # "separation" or "generation"
    x0: np.ndarray
    rng: np.random.Generator  # after x0: each window's noise mixture / posterior noise
    text_features: list
    frames: PrefetchedWindows | None
    cuts: Iterator | None  # (w, mixture samples) in window order; None: no mixture latents
    sink: Callable[[int, np.ndarray], None] | None
    latents: np.ndarray | None  # final latents, window-major, when kept
    timings: Timings
    started: float
    origin: float  # seconds in the video's own time line where the output begins
    joiners: list = field(init=False)
    pieces: list = field(init=False)
    windows: dict = field(default_factory=dict)  # w -> inputs, for the windows in flight
    batches: int = 0

    def __post_init__(self):
        self.joiners = [CrossfadeJoiner(self.plan) for _ in self.settings.texts]
        self.pieces = [[] for _ in self.settings.texts]


def run_requests(sep: Separator, requests: Sequence[Mapping], *,
                 progress: Callable[[int, int], None] | None = None) -> list:
    """Run ``requests`` (each a dict of ``process`` keyword arguments) with shared batches;
    returns, in order, a ``SeparationResult`` or the exception that request failed with.
    ``progress(done, total)`` is called after each batch that leaves one of its requests
    going."""
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable, got {type(progress).__name__}")
    out: list = [None] * len(requests)
    live: dict[int, _Request] = {}
    with ExitStack() as resources:
        for i, options in enumerate(requests):
            try:
                live[i] = _open_request(sep, options, resources)
            except Exception as exc:  # noqa: BLE001 - reported in the request's place
                out[i] = exc
        groups = _groups(live)
        total, done = sum(math.ceil(len(g) / sep.max_batch) for g in groups), 0
        for group in groups:
            for batch in _batches(group, sep.max_batch, out):
                _produce_inputs(sep, live, batch, out)
                batch = [item for item in batch if out[item[0]] is None]
                if batch:
                    waves = _run_batch(sep, live, batch, out)
                    if waves is not None:
                        _join_outputs(live, batch, waves, out)
                done += 1
                if progress is not None and any(out[i] is None for i, _, _ in batch):
                    progress(done, total)
    for i, r in live.items():
        if out[i] is None:
            out[i] = _result(sep, r)
    return out


# -- plan windows ------------------------------------------------------------------------------
def _settings(sep: Separator, options: Mapping) -> _Settings:
    if not isinstance(options, Mapping):
        raise TypeError(f"a request must be a dict of process() options, got "
                        f"{type(options).__name__}")
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"unknown request options: {', '.join(sorted(unknown))}")
    if options.get("sink") is not None and not callable(options["sink"]):
        raise TypeError(f"sink must be callable, got {type(options['sink']).__name__}")
    if not isinstance(options.get("generate", False), (bool, np.bool_)):
        raise InputError(f"generate must be True or False, got {options['generate']!r}")
    steps, cfg = options.get("steps"), options.get("cfg")
    steps = sep.info.default_steps if steps is None else steps
    cfg = sep.info.default_cfg if cfg is None else cfg
    seed = options.get("seed", 0)
    check_options(steps, cfg, seed)
    texts = request_texts(options.get("text"))
    negative_text = options.get("negative_text")
    if negative_text is not None:
        negative_text = one_text(negative_text, "negative text")
    return _Settings(texts, negative_text, steps, cfg, seed)


def _open_request(sep: Separator, options: Mapping, resources: ExitStack) -> _Request:
    """Check one request, plan its windows, draw its noise and open its inputs; what it opens
    is closed with ``resources``, or at once if the request fails here."""
    with ExitStack() as opened:
        request = _plan_request(sep, options, opened)
        resources.enter_context(opened.pop_all())
    return request


def _plan_request(sep: Separator, options: Mapping, opened: ExitStack) -> _Request:
    info, started, timings = sep.info, time.perf_counter(), Timings()
    settings = _settings(sep, options)
    with timings.measure("decode"):
        source = sep._video_source(options.get("video"), options.get("video_fps"))
        mixture = sep._mixture(options.get("mix"), source, options.get("generate", False))
        origin = sep._time_origin(source, options.get("mix"), mixture)
    length = request_length(info, mixture, source, options.get("duration"))
    sr = info.sample_rate
    plan = WindowPlan(length, info.window_samples, round(sep.overlap * sr), sr)
    shape = (plan.count * len(settings.texts), *info.latent_shape)
    rng = np.random.default_rng(settings.seed)
    x0 = rng.standard_normal(shape, dtype=np.float32)
    if mixture is not None:
        cuts = opened.enter_context(closing(mixture.windows(plan)))
    elif info.separation:
        cuts = noise_mixtures(rng, plan.count, info.window_samples)
    else:
        cuts = None
    with timings.measure("features"):
        text_features = sep._text_batch(settings.texts)
    with timings.measure("conditioning"):
        sep._unconditional(settings.negative_text)  # checked now: it fails this request alone
    frames = None
    if source is not None:
        frames = opened.enter_context(
            PrefetchedWindows(opened.enter_context(sep._video_windows(source, plan, origin))))
    return _Request(settings, plan, length,
                    "separation" if mixture is not None else "generation", x0, rng,
                    text_features, frames, cuts, options.get("sink"),
                    np.empty(shape, np.float32) if options.get("keep_latents") else None,
                    timings, started, origin)


def _groups(live: dict[int, _Request]) -> list[list[tuple[int, int, int]]]:
    """The (request, window, text) items of each batch group: request-major, window-major
    within a request."""
    groups = []
    for key in dict.fromkeys(r.settings.key for r in live.values()):
        groups.append([(i, w, k) for i, r in live.items() if r.settings.key == key
                       for w in range(r.plan.count) for k in range(len(r.settings.texts))])
    return groups


def _batches(items: list, size: int, out: list) -> Iterator[list]:
    """``items`` in batches of at most ``size``, dropping those of requests that have failed
    by the time the batch is made."""
    pending = list(items)
    while pending:
        pending = [item for item in pending if out[item[0]] is None]
        if pending:
            yield pending[:size]
            pending = pending[size:]


# -- produce inputs ----------------------------------------------------------------------------
def _produce_inputs(sep: Separator, live: dict[int, _Request], batch: list, out: list) -> None:
    """Video features and mixture latents of the windows ``batch`` needs that are not made yet;
    a request's windows are made in order. A request that fails here fails alone."""
    for i in dict.fromkeys(i for i, _, _ in batch):
        r = live[i]
        needed = sorted({w for j, w, _ in batch if j == i})
        try:
            r.windows = {w: r.windows[w] for w in needed if w in r.windows}  # a straddling one
            new = [w for w in needed if w not in r.windows]
            for w in new:
                r.windows[w] = sep._window_features(r.frames, r.timings)
            if r.cuts is not None:
                sep._encode_windows(r.cuts, r.rng, new, r.windows, r.timings)
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            out[i] = exc


# -- run batches -------------------------------------------------------------------------------
def _run_batch(sep: Separator, live: dict[int, _Request], batch: list,
               out: list) -> np.ndarray | None:
    """The batch's waveforms (one per item), or None when it failed (its requests fail)."""
    first = live[batch[0][0]].settings
    inputs = BatchInputs(
        windows=[live[i].windows[w] for i, w, _ in batch],
        text_features=[live[i].text_features[k] for i, _, k in batch],
        x0=np.stack([live[i].x0[_item_index(live[i], w, k)] for i, w, k in batch]),
        unconditional=sep._unconditional(first.negative_text), steps=first.steps,
        cfg=first.cfg)
    timings = Timings()
    involved = list(dict.fromkeys(i for i, _, _ in batch))
    try:
        waves, x1 = sep._run_batch(inputs, timings)
        keeping = any(live[i].latents is not None for i in involved)
        latents = sep.backend.to_host(x1) if keeping else None  # copied only when kept
    except Exception as exc:  # noqa: BLE001 - the requests of this batch fail
        for i in involved:
            out[i] = exc
        return None
    for i in involved:  # a shared batch's time counts in each request that took part
        live[i].batches += 1
        live[i].timings.add(timings)
    if latents is not None:
        for (i, w, k), latent in zip(batch, latents):
            if live[i].latents is not None:
                live[i].latents[_item_index(live[i], w, k)] = latent
    return waves


def _item_index(r: _Request, w: int, k: int) -> int:
    return w * len(r.settings.texts) + k


# -- join outputs ------------------------------------------------------------------------------
def _join_outputs(live: dict[int, _Request], batch: list, waves: np.ndarray, out: list) -> None:
    """Cross-fade each item's waveform into its request's text ``k``: collected, or handed to
    the request's sink (a failing sink fails its request)."""
    for (i, w, k), wave in zip(batch, waves):
        r = live[i]
        piece = r.joiners[k].push(wave)
        if r.sink is None:
            r.pieces[k].append(piece)
        elif piece.size and out[i] is None:
            try:
                r.sink(k, piece)
            except Exception as exc:  # noqa: BLE001 - a failing writer fails its request
                out[i] = exc


def _result(sep: Separator, r: _Request) -> SeparationResult:
    """The finished request's result, once its resources are closed (the video's decode time
    is then final)."""
    timings = dict(r.timings)
    work, wait = (r.frames.work_s, r.frames.wait_s) if r.frames is not None else (0.0, 0.0)
    timings["decode"] += work
    timings["decode_wait"], timings["decode_hidden"] = wait, max(0.0, work - wait)
    timings["wall"] = time.perf_counter() - r.started
    audio = None if r.sink is not None else np.stack([np.concatenate(p) for p in r.pieces])
    items = r.plan.count * len(r.settings.texts)
    return SeparationResult(audio, r.length, sep.info.sample_rate, r.mode, r.plan.count, items,
                            r.batches, timings, r.latents, r.origin)
