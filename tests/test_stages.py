"""mmsep/stages.py: the stage registry, the contracts it builds, and the JSON forms the manifest
carries (torch-free)."""

import json
from dataclasses import replace

import pytest

from mmsep.stages import (NORMALIZED_MEAN, POSTERIOR_SAMPLE, STAGE_ORDER, STAGES, Geometry, Stage,
                          StageSpec, Tensor, build_stage_specs, dim_size, euler_schedule,
                          stage_names)

PIPELINE = ("clip_image", "clip_text", "sync", "mix_encoder", "conditioner", "denoiser",
            "vae_decoder", "vocoder")


def tiny_geometry(**changes) -> Geometry:
    """The tiny 44.1 kHz preset's geometry of a 2 s window (what mmsep-export writes for it)."""
    g = Geometry(sample_rate=44100, window_samples=87 * 1024, window_seconds=2.0, latent_len=87,
                 latent_dim=40, n_mels=128, mel_frames=174, clip_len=16, clip_dim=64,
                 clip_image_size=384, sync_fps=25.0, sync_segments=5, sync_tokens_per_segment=8,
                 sync_frames_per_segment=16, sync_segment_stride=8, sync_dim=48,
                 sync_image_size=224, text_len=77, text_dim=64, separation=True,
                 conditioning=(("clip", (16, 64)), ("sync", (87, 64)), ("text", (77, 64)),
                               ("global_c", (64,))),
                 mixture_latent=POSTERIOR_SAMPLE)
    return replace(g, **changes)


def test_registry_order_is_the_pipeline_order():
    assert STAGE_ORDER == tuple(s.name for s in STAGES) == PIPELINE
    assert {getattr(Stage, a) for a in dir(Stage) if a.isupper()} == set(STAGE_ORDER)
    assert list(build_stage_specs(tiny_geometry())) == list(STAGE_ORDER)


def test_stage_names_per_model_kind():
    assert stage_names(True) == PIPELINE
    assert stage_names(False) == tuple(n for n in PIPELINE if n != Stage.MIX_ENCODER)
    generation = tiny_geometry(separation=False, mixture_latent=None)
    assert tuple(build_stage_specs(generation)) == stage_names(False)


@pytest.mark.parametrize("dim,batch,size", [(7, 3, 7), ("batch", 3, 3), ("2*batch", 3, 6),
                                            ("16*batch", 2, 32)])
def test_dim_size(dim, batch, size):
    assert dim_size(dim, batch) == size


@pytest.mark.parametrize("dim", ["2batch", "batch*2", "b", "-1*batch"])
def test_dim_size_refuses_a_bad_symbol(dim):
    with pytest.raises(ValueError, match="bad dimension symbol"):
        dim_size(dim, 1)


def test_contract_shapes_and_profiles():
    specs = build_stage_specs(tiny_geometry(), max_batch=4)
    denoiser = specs[Stage.DENOISER]
    assert denoiser.input_names[:5] == (Tensor.X, Tensor.MIX_LATENT, Tensor.T, Tensor.DT,
                                        Tensor.CFG)
    assert denoiser.tensor(Tensor.conditioning("clip")).concrete(3) == (6, 16, 64)
    assert denoiser.tensor(Tensor.X_NEXT).concrete(3) == (3, 87, 40)
    assert specs[Stage.MIX_ENCODER].input_names == (Tensor.WAVEFORM, Tensor.NOISE)
    assert specs[Stage.CLIP_TEXT].tensor(Tensor.TOKENS).dtype == "int64"
    assert specs[Stage.CONDITIONER].tensor(Tensor.SYNC_FEATURES).concrete(1) == (1, 40, 48)
    # per-window stages batch windows; the visual encoders batch frames and segments
    assert (specs[Stage.VOCODER].opt_batch, specs[Stage.VOCODER].max_batch) == (2, 4)
    assert (specs[Stage.CLIP_IMAGE].opt_batch, specs[Stage.CLIP_IMAGE].max_batch) == (16, 64)
    assert (specs[Stage.SYNC].opt_batch, specs[Stage.SYNC].max_batch) == (5, 20)
    normalized = build_stage_specs(tiny_geometry(mixture_latent=NORMALIZED_MEAN))
    assert normalized[Stage.MIX_ENCODER].input_names == (Tensor.WAVEFORM,)
    generation = build_stage_specs(tiny_geometry(separation=False, mixture_latent=None))
    assert Tensor.MIX_LATENT not in generation[Stage.DENOISER].input_names


def test_stage_spec_json_round_trip():
    for spec in build_stage_specs(tiny_geometry()).values():
        data = json.loads(json.dumps(spec.to_json()))
        assert StageSpec.from_json(data) == spec
        assert "extra" not in data


def test_geometry_json_round_trip_with_video_rates():
    g = tiny_geometry()
    data = json.loads(json.dumps(g.to_json()))
    assert (data["sync_fps"], data["sync_segment_stride"], data["window_seconds"]) == (25.0, 8, 2.0)
    back = Geometry.from_json(data)
    assert back == g
    assert back.clip_fps == 8.0 and back.sync_frames == 48
    generation = tiny_geometry(separation=False, mixture_latent=None)
    assert Geometry.from_json(json.loads(json.dumps(generation.to_json()))) == generation


def test_geometry_from_incomplete_json_raises_key_error():
    data = tiny_geometry().to_json()
    del data["sync_fps"]
    with pytest.raises(KeyError, match="sync_fps"):
        Geometry.from_json(data)


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_euler_schedule(steps):
    times, dt = euler_schedule(steps)
    assert times == [i / steps for i in range(steps)] and dt == 1.0 / steps
    assert times[0] == 0.0 and abs(times[-1] + dt - 1.0) < 1e-12


@pytest.mark.parametrize("convention", [None, "posterior-mean", ""])
def test_a_bad_mixture_latent_convention_is_refused(convention):
    with pytest.raises(ValueError, match="mixture latent convention"):
        build_stage_specs(tiny_geometry(mixture_latent=convention))
