"""The 25-step drift of reduced precision (benchmarks/gpu_parity.py): one request's final latent
from every TRAJECTORIES variant, against the PyTorch fp32 denoiser stage, with the SI-SDR of the
decoded waveforms. Not gated: random weights with CFG amplify rounding (DESIGN.md, Numerics)."""

from __future__ import annotations

import copy
import functools
import time

import numpy as np
import torch

from mmsep.export.example_inputs import example_inputs
from mmsep.export.parity import relative_l2
from mmsep.models.sampler import CONDITION_KEYS, sample
from mmsep.runtime.backends.protocol import stack_branches
from mmsep.runtime.errors import one_line as message_line
from mmsep.stages import Stage, Tensor, euler_schedule

say = functools.partial(print, flush=True)  # progress lines show as they come


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {message_line(exc, 400)}"


TRAJECTORIES = {
    "ort_fp32": "the fp32 denoiser graph",
    "ort_fp16": "the fp16 mixed-precision denoiser graph (its Euler update stays fp32)",
    "torch_fp32": "the PyTorch fp32 denoiser stage",
    "torch_bf16": "the PyTorch reference sampler (mmsep.models.sampler.sample; benchmarks/"
                  "baseline.py on CUDA), network in bf16, t and the Euler state in fp32",
    "torch_fp16": "the same with the network in fp16",
}



def denoiser_inputs(components, specs, modules, device: str, batch: int, seed: int):
    """Example conditioner features, the denoiser's step-invariant inputs (the CFG branches
    stacked as the runtime does, the unconditional one from the learned empty features), x0."""
    conditioner, spec = modules[Stage.CONDITIONER], specs[Stage.DENOISER]
    names = specs[Stage.CONDITIONER].output_names

    def condition(features) -> dict[str, np.ndarray]:
        out = conditioner(*(torch.as_tensor(f).to(device) for f in features))
        return {n: o.float().cpu().numpy() for n, o in zip(names, out)}

    features = list(example_inputs(specs[Stage.CONDITIONER], batch, seed).values())
    fixed = stack_branches(condition(features), condition(components.flow.empty_conditions(1)))
    if Tensor.MIX_LATENT in spec.input_names:
        fixed[Tensor.MIX_LATENT] = example_inputs(spec, batch, seed)[Tensor.MIX_LATENT].numpy()
    shape = spec.tensor(Tensor.X).concrete(batch)
    return features, fixed, np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def step_inputs(names, fixed: dict, x, t: float, dt: float, cfg: float) -> dict:
    """One Euler step's denoiser inputs, in the graph's input order."""
    values = {**fixed, Tensor.X: x, **{n: np.full(len(x), v, np.float32) for n, v in (
        (Tensor.T, t), (Tensor.DT, dt), (Tensor.CFG, cfg))}}
    return {n: values[n] for n in names}


def sample_graph(sess, names, fixed, x0, steps: int, cfg: float) -> np.ndarray:
    times, dt = euler_schedule(steps)
    x = x0
    for t in times:
        (x,) = sess.run([Tensor.X_NEXT], step_inputs(names, fixed, x, t, dt, cfg))
    return x


def sample_stage(module, names, fixed, x0, steps: int, cfg: float, device) -> np.ndarray:
    """Euler with the torch fp32 denoiser stage (it does the update itself)."""
    fixed = {n: torch.from_numpy(v).to(device) for n, v in fixed.items()}
    times, dt = euler_schedule(steps)
    x = torch.from_numpy(x0).to(device)
    for t in times:
        inputs = step_inputs(names, fixed, x, t, dt, cfg)
        x = module(*(torch.as_tensor(v).to(device) for v in inputs.values()))
    return x.cpu().numpy()


def sample_reference(flow, features, fixed, x0, steps: int, cfg: float, dtype, device):
    """The reference sampler, a copy of the network in ``dtype``. Not the denoiser stage cast to
    it: that does the Euler update itself, rounding the state to bf16 every step (3.3e-1 against
    2.9e-2 with an fp32 state: tiny, 3 steps, cfg 4.5), which no cast between steps undoes."""
    mix = fixed.get(Tensor.MIX_LATENT)
    x1 = sample(copy.deepcopy(flow).to(device, dtype), torch.from_numpy(x0).to(device),
                {k: f.to(device) for k, f in zip(CONDITION_KEYS, features)},
                None if mix is None else torch.from_numpy(mix).to(device), steps, cfg)
    return x1.float().cpu().numpy()


def sample_all(components, specs, modules, sessions, device, batch, seed, steps, cfg) -> dict:
    """One trajectory entry: every TRAJECTORIES variant's final latent against torch fp32."""
    say(f"trajectory cfg {cfg}: {steps} steps, {', '.join(TRAJECTORIES)}")
    entry = {"cfg": cfg, "steps": steps, "seconds": {}, "error": None}
    try:
        features, fixed, x0 = denoiser_inputs(components, specs, modules, device, batch, seed)
        names, stage, finals = specs[Stage.DENOISER].input_names, modules[Stage.DENOISER], {}
        for label in TRAJECTORIES:
            started, precision = time.perf_counter(), label.split("_")[1]
            if label.startswith("ort"):
                final = sample_graph(sessions[precision], names, fixed, x0, steps, cfg)
            elif precision == "fp32":
                final = sample_stage(stage, names, fixed, x0, steps, cfg, device)
            else:
                dtype = torch.bfloat16 if precision == "bf16" else torch.float16
                final = sample_reference(components.flow, features, fixed, x0, steps, cfg, dtype,
                                         device)
            finals[label], entry["seconds"][label] = final, time.perf_counter() - started
        rel = {"ort_fp16_vs_ort_fp32": relative_l2(finals["ort_fp16"], finals["ort_fp32"])}
        rel.update({f"{label}_vs_torch_fp32": relative_l2(final, finals["torch_fp32"])
                    for label, final in finals.items() if label != "torch_fp32"})
        # both against the same fp32 reference; a nan compares False
        entry["fp16_within_reference_bf16"] = bool(
            rel["ort_fp16_vs_torch_fp32"] <= rel["torch_bf16_vs_torch_fp32"])
        entry["rel_l2"], entry["si_sdr_db"] = rel, decoded_si_sdr(modules, finals, device)
    except Exception as exc:  # noqa: BLE001 - not gated: reported, and the report still written
        entry["error"] = one_line(exc)
    return entry


def decoded_si_sdr(modules, finals: dict[str, np.ndarray], device: str) -> dict:
    """SI-SDR (dB, batch mean) of each final latent's waveform against torch fp32's."""
    decode, vocode = modules[Stage.VAE_DECODER], modules[Stage.VOCODER]  # torch fp32
    waves = {label: vocode(decode(torch.from_numpy(latent).to(device))).double().cpu().numpy()
             for label, latent in finals.items()}
    ref = waves.pop("torch_fp32")
    scale = (ref * ref).sum(-1, keepdims=True)
    targets = {label: (est * ref).sum(-1, keepdims=True) / scale * ref
               for label, est in waves.items()}
    return {label: float(np.mean(10 * np.log10((target ** 2).sum(-1) / np.maximum(
        ((waves[label] - target) ** 2).sum(-1), 1e-30)))) for label, target in targets.items()}


def print_trajectory(entry: dict) -> None:
    head = f"trajectory cfg {entry['cfg']} ({entry['steps']} steps, not gated)"
    if entry["error"]:
        say(f"{head}: ERROR {entry['error']}")
        return
    say(f"{head}: final latent rel L2; SI-SDR of the decoded waveform vs torch_fp32")
    scores = entry["si_sdr_db"]
    for pair, value in entry["rel_l2"].items():
        score = scores.get(pair.removesuffix("_vs_torch_fp32"))
        say(f"  {pair:<32} {value:.2e}" + ("" if score is None else f"  {score:7.1f} dB"))
    say(f"  fp16_within_reference_bf16: {str(entry['fp16_within_reference_bf16']).lower()}")
