"""A reference-style PyTorch pipeline: what the public MMAudio inference code does, per query.

Eager modules; one (window, query) item at a time; full-resolution RGB frames decoded with PyAV
and preprocessed in torch (``mmsep.models.video_reference``); the CLIP, Synchformer and text
encoders run per item; the sampler makes two network calls per Euler step (conditional and
unconditional branch); bf16 on CUDA, fp32 on the CPU. The video and the mixture are decoded once
and preprocessed once per window (generous to the baseline: running the public demo once per
query would do that once per query). Windows, window cuts, noise and crossfades are the runtime's,
and the mixture latent is the authors' posterior sample (the default convention), so both
pipelines compute the same function of the same inputs.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from mmsep.models import video_reference as vref
from mmsep.models.sampler import guided_euler_step, mixture_latent
from mmsep.runtime import audio as audio_io
from mmsep.runtime.requests import TIMING_KEYS
from mmsep.runtime.windows import CrossfadeJoiner, WindowPlan
from mmsep.stages import euler_schedule, guidance_strength

SEGMENT_FRAMES, SEGMENT_STRIDE = 16, 8


class BaselinePipeline:
    def __init__(self, components, *, device: str = "cpu", overlap: float = 1.0):
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.precision = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        c = components
        self.flow = c.flow.to(self.device, self.dtype).eval()
        self.vae = c.vae.to(self.device, self.dtype).eval()
        self.mel = c.mel.to(self.device, self.dtype).eval()
        self.vocoder = c.vocoder.to(self.device, self.dtype).eval()
        self.clip = c.clip.to(self.device, self.dtype).eval()
        self.synchformer = c.synchformer.to(self.device, self.dtype).eval()
        config = self.flow.config
        self.sample_rate = config.sample_rate
        self.window_seconds = config.duration
        self.window_samples = config.lengths.audio_samples
        self.latent_shape = (config.latent_seq_len, config.latent_dim)
        self.overlap = overlap

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _clock(self) -> float:
        self._sync()
        return time.perf_counter()

    @torch.inference_mode()
    def process(self, *, mix: Path, video: Path | None, texts: list[str], steps: int,
                cfg: float, seed: int = 0) -> tuple[np.ndarray, dict[str, float]]:
        """Separated audio (n_texts, length) and seconds per stage (the runtime's keys)."""
        import open_clip

        timings = dict.fromkeys(TIMING_KEYS, 0.0)
        sr = self.sample_rate
        started = self._clock()
        mixture = audio_io.read_audio(mix, sr)
        timings["decode"] += time.perf_counter() - started
        plan = WindowPlan(mixture.size, self.window_samples, round(self.overlap * sr), sr)
        n_texts = len(texts)
        rng = np.random.default_rng(seed)
        x0 = rng.standard_normal((plan.count * n_texts, *self.latent_shape), dtype=np.float32)
        frames = _WindowedFrames(video, plan.start_seconds, self.window_seconds, timings) \
            if video is not None else None
        joiners = [CrossfadeJoiner(plan) for _ in texts]
        pieces: list[list[np.ndarray]] = [[] for _ in texts]
        for w in range(plan.count):
            # the runtime's draw order: x0 of all items, then each window's posterior noise
            eps = torch.from_numpy(rng.standard_normal(self.latent_shape, dtype=np.float32))
            video_in = None
            if frames is not None:
                pixels = frames.window(w)
                started = time.perf_counter()
                video_in = vref_window(pixels, self.window_seconds, plan.start_seconds[w])
                del pixels
                timings["decode"] += time.perf_counter() - started
            for k, text in enumerate(texts):
                started = self._clock()
                clip_f = sync_f = None
                if video_in is not None:
                    clip_in, sync_in = video_in
                    clip_f = self.clip.encode_image(clip_in.to(self.device, self.dtype))[None]
                    segments = sync_in.unfold(0, SEGMENT_FRAMES, SEGMENT_STRIDE)
                    segments = segments.permute(0, 4, 1, 2, 3).to(self.device, self.dtype)
                    sync_f = self.synchformer(segments).flatten(0, 1)[None]
                tokens = open_clip.tokenize([text]).to(self.device)
                text_f = self.clip.encode_text(tokens)
                now = self._clock()
                timings["features"] += now - started

                wave = torch.from_numpy(plan.cut(mixture, w)[None]).to(self.device, self.dtype)
                x_mix = mixture_latent(wave, self.mel, self.vae, self.flow.latent_mean,
                                       self.flow.latent_std,
                                       noise=eps[None].to(self.device, self.dtype))
                started = self._clock()
                timings["mix_encode"] += started - now

                x1 = self._sample(torch.from_numpy(x0[w * n_texts + k][None]), clip_f, sync_f,
                                  text_f, x_mix, steps, cfg, timings)

                started = self._clock()
                mel = self.vae.decode(self.flow.unnormalize(x1.to(self.dtype)).transpose(1, 2))
                now = self._clock()
                timings["vae_decode"] += now - started
                audio = self.vocoder(mel)[0].float().cpu().numpy()
                timings["vocode"] += time.perf_counter() - now
                pieces[k].append(joiners[k].push(audio))
        return np.stack([np.concatenate(p) for p in pieces]), timings

    def _sample(self, x0, clip_f, sync_f, text_f, x_mix, steps, cfg, timings):
        """mmsep.models.sample with the step-invariant conditioning timed apart: Euler with two
        network calls per step, network in its dtype, accumulator in fp32."""
        net = self.flow
        started = self._clock()
        empty_clip, empty_sync, empty_text = net.empty_conditions(1)
        cond = net.prepare_conditions(empty_clip if clip_f is None else clip_f,
                                      empty_sync if sync_f is None else sync_f, text_f)
        uncond = net.prepare_conditions(empty_clip, empty_sync, empty_text)
        now = self._clock()
        timings["conditioning"] += now - started
        x = x0.to(self.device, torch.float32)
        cfg = guidance_strength(cfg)
        times, dt = euler_schedule(steps)
        for start in times:
            t = torch.full((1,), start, device=self.device, dtype=torch.float32)
            xi = x.to(self.dtype)
            v = net.velocity(xi, t, cond, x_mix).float()
            v_u = net.velocity(xi, t, uncond, x_mix).float() if cfg != 1 else None
            x = guided_euler_step(x, dt, cfg, v, v_u)
        timings["sampling"] += self._clock() - now
        return x


def vref_window(pixels, window_seconds: float, start: float):
    """CLIP and Synchformer inputs of one window from its decoded (frames, timestamps)."""
    frames, stamps = pixels
    clip_in = vref.clip_frames(frames, stamps, window_seconds, start=start)
    sync_in = vref.sync_frames(frames, stamps, window_seconds, start=start)
    return clip_in, sync_in


class _WindowedFrames:
    """Full-resolution RGB frames of each window, decoded once in one pass with PyAV.

    Only the frames a window can select are held (from its start to the first frame past its
    end), so memory stays at about one window of full-resolution frames. Time spent decoding and
    converting is added to ``timings["decode"]``.
    """

    def __init__(self, path: Path, starts: list[float], window_seconds: float, timings):
        import av

        self._container = av.open(str(path))
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        self._rate = float(stream.average_rate or stream.guessed_rate or 25)
        self._decoder = enumerate(self._container.decode(stream))
        self._starts = starts
        self._window = window_seconds
        self._timings = timings
        self._held: deque = deque()  # (timestamp, uint8 (H, W, 3))
        self._done = False

    def _next(self) -> bool:
        try:
            index, frame = next(self._decoder)
        except StopIteration:
            self._done = True
            self._container.close()
            return False
        stamp = index / self._rate if frame.time is None else float(frame.time)
        self._held.append((stamp, frame.to_ndarray(format="rgb24")))
        return True

    def window(self, w: int):
        started = time.perf_counter()
        start, end = self._starts[w], self._starts[w] + self._window
        while not self._done and (not self._held or self._held[-1][0] < end):
            self._next()
        # frames before the start are never selected, except the last one when nothing follows
        while len(self._held) > 1 and self._held[0][0] < start - vref.TIME_TOLERANCE:
            self._held.popleft()
        stamps = [s for s, _ in self._held]
        frames = torch.from_numpy(np.stack([f for _, f in self._held]))
        self._timings["decode"] += time.perf_counter() - started
        return frames, stamps
