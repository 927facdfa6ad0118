"""Several requests in one pass (``Separator.process_many``): the (window, text) items of
different requests share denoiser batches.

Requests share a batch only when they agree on what the denoiser takes once per batch: steps,
cfg and the negative text (the unconditional branch); generation mode's noise mixture is encoded
like a real mixture, so both modes share batches. Each request keeps its own random draws: its
items' ``x0``, then per window its noise mixture (generation mode) and posterior noise, from its
own seed exactly as ``process`` draws them, so a request's output does not depend on which
others it was batched with. A request that fails (bad media, a bad option) gets its exception in
its place and the others go on; a failing shared batch fails the requests that were in it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .prefetch import PrefetchedWindows
from .requests import (TIMING_KEYS, SeparationResult, check_options, noise_mixtures, one_text,
                       request_length, request_texts)
from .separator import Separator
from .video import WindowFrames
from .windows import CrossfadeJoiner, WindowPlan

_OPTIONS = {"mix", "video", "text", "negative_text", "steps", "cfg", "seed", "video_fps",
            "generate", "duration", "sink"}


@dataclass
class _Request:
    """One request's state while its items are in flight."""
    texts: list
    negative_text: str | None
    steps: int
    cfg: float
    length: int
    plan: WindowPlan
    x0: np.ndarray
    rng: np.random.Generator  # after x0: each window's noise mixture / posterior noise
    mode: str  # "separation" or "generation"
    text_features: list
    frames: PrefetchedWindows | None
    cuts: object
    sink: Callable[[int, np.ndarray], None] | None
    joiners: list
    pieces: list
    timings: dict
    windows: dict = field(default_factory=dict)
    batches: int = 0

    @property
    def key(self) -> tuple:
        return self.steps, self.cfg, self.negative_text

    def close(self) -> None:
        if self.frames is not None:
            self.frames.close()
            self.timings["decode"] += self.frames.work_s


def process_many(sep: Separator, requests: Sequence[Mapping]) -> list:
    """Run ``requests`` (each a dict of ``process`` keyword arguments: mix, video, text,
    negative_text, steps, cfg, seed, video_fps, generate, duration, sink) with shared batches;
    returns, in order, a ``SeparationResult`` or the exception that request failed with."""
    out: list = [None] * len(requests)
    live: dict[int, _Request] = {}
    for i, options in enumerate(requests):
        try:
            live[i] = _prepare(sep, options)
        except Exception as exc:  # noqa: BLE001 - reported in the request's place
            out[i] = exc
    try:
        for key in dict.fromkeys(r.key for r in live.values()):
            group = [i for i, r in live.items() if r.key == key]
            items = [(i, w, k) for i in group for w in range(live[i].plan.count)
                     for k in range(len(live[i].texts))]
            _run_items(sep, live, items, out)
        for i, r in live.items():
            if out[i] is None:
                audio = (None if r.sink is not None
                         else np.stack([np.concatenate(p) for p in r.pieces]))
                out[i] = SeparationResult(audio, r.length, sep.info.sample_rate, r.mode,
                                          r.plan.count, r.plan.count * len(r.texts), r.batches,
                                          r.timings)
    finally:
        for r in live.values():
            r.close()
    return out


def _prepare(sep: Separator, options: Mapping) -> _Request:
    """Check one request and draw its noise, as ``Separator.process`` does."""
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"unknown request options: {', '.join(sorted(unknown))}")
    info = sep.info
    steps = options.get("steps")
    steps = info.default_steps if steps is None else steps
    cfg = options.get("cfg")
    cfg = info.default_cfg if cfg is None else cfg
    seed = options.get("seed", 0)
    check_options(steps, cfg, seed)
    texts = request_texts(options.get("text"))
    negative_text = options.get("negative_text")
    if negative_text is not None:
        negative_text = one_text(negative_text, "negative text")
    timings = dict.fromkeys(TIMING_KEYS, 0.0)
    started = time.perf_counter()
    source = sep._video_source(options.get("video"), options.get("video_fps"))
    mixture = sep._mixture(options.get("mix"), source, options.get("generate", False))
    timings["decode"] += time.perf_counter() - started
    length = request_length(sep.info, mixture, source, options.get("duration"))
    sr = info.sample_rate
    plan = WindowPlan(length, info.window_samples, round(sep.overlap * sr), sr)
    shape = (plan.count * len(texts), *info.latent_shape)
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(shape, dtype=np.float32)
    if mixture is not None:
        cuts = mixture.windows(plan)
    elif info.separation:
        cuts = noise_mixtures(rng, plan.count, info.window_samples)
    else:
        cuts = None
    started = time.perf_counter()
    text_features = sep._text_batch(texts)
    timings["features"] += time.perf_counter() - started
    started = time.perf_counter()
    sep._unconditional(negative_text)  # checked now, so that it fails this request alone
    timings["conditioning"] += time.perf_counter() - started
    frames = (None if source is None
              else PrefetchedWindows(WindowFrames(source, plan.start_seconds,
                                                  sep._video_geometry(), resizer=sep._resizer)))
    mode = "separation" if mixture is not None else "generation"
    return _Request(texts, negative_text, steps, cfg, length, plan, x0, rng, mode, text_features,
                    frames, cuts, options.get("sink"), [CrossfadeJoiner(plan) for _ in texts],
                    [[] for _ in texts], timings)


def _run_items(sep: Separator, live: dict[int, _Request], items: list, out: list) -> None:
    """Run one group's items (request-major, window-major within a request) in batches of at
    most ``max_batch``; a request's windows are read in order, as ``process`` reads them."""
    pending = list(items)
    while pending:
        pending = [it for it in pending if out[it[0]] is None]
        batch, pending = pending[:sep.max_batch], pending[sep.max_batch:]
        for i in dict.fromkeys(i for i, _, _ in batch):
            try:
                _load_windows(sep, live[i], sorted({w for j, w, _ in batch if j == i}))
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                out[i] = exc
        batch = [it for it in batch if out[it[0]] is None]
        if batch:
            _run_batch(sep, live, batch, out)


def _load_windows(sep: Separator, r: _Request, needed: list[int]) -> None:
    r.windows = {w: r.windows[w] for w in needed if w in r.windows}  # keep a straddling one
    new = [w for w in needed if w not in r.windows]
    for w in new:
        r.windows[w] = sep._window_features(r.frames, r.timings)
    if r.cuts is not None:
        sep._encode_windows(r.cuts, r.rng, new, r.windows, r.timings)


def _run_batch(sep: Separator, live: dict[int, _Request], batch: list, out: list) -> None:
    first = live[batch[0][0]]
    members = [((i, w), (i, k)) for i, w, k in batch]
    windows = {(i, w): live[i].windows[w] for i, w, _ in batch}
    text_features = {(i, k): live[i].text_features[k] for i, _, k in batch}
    x0 = np.stack([live[i].x0[w * len(live[i].texts) + k] for i, w, k in batch])
    timings = dict.fromkeys(TIMING_KEYS, 0.0)
    involved = list(dict.fromkeys(i for i, _, _ in batch))
    try:
        audio, _ = sep._run_batch(members, windows, text_features,
                                  sep._unconditional(first.negative_text), x0,
                                  first.steps, first.cfg, timings)
    except Exception as exc:  # noqa: BLE001 - the requests of this batch fail
        for i in involved:
            out[i] = exc
        return
    for i in involved:  # a shared batch's time counts in each request that took part
        live[i].batches += 1
        for name, seconds in timings.items():
            live[i].timings[name] += seconds
    for (i, w, k), wave in zip(batch, audio):
        r = live[i]
        piece = r.joiners[k].push(wave)
        if r.sink is None:
            r.pieces[k].append(piece)
        elif piece.size and out[i] is None:
            try:
                r.sink(k, piece)
            except Exception as exc:  # noqa: BLE001 - a failing writer fails its request
                out[i] = exc
