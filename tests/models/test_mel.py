"""MelSpectrogram against a torch.stft + librosa reference of MMAudio's mel converter."""

import math

import numpy as np
import pytest
import torch

from mmsep.models.mel import MelSpectrogram, dft_basis, slaney_mel_filterbank
from mmsep.models.presets import AUDIO_MODES, sequence_lengths
from tests.helpers import rel_l2

librosa = pytest.importorskip("librosa", reason="librosa, the independent reference, is not "
                              "installed (the test extra: pip install '.[test]')")

MODES = ("16k", "44k")


def reference_log_mel(wave: torch.Tensor, mode: str, dtype=torch.float32) -> torch.Tensor:
    """MMAudio's mel converter written with torch.stft (reflect pad, no centring, periodic Hann)."""
    m = AUDIO_MODES[mode]
    x = wave.to(dtype).clamp(-1, 1)
    pad = (m.n_fft - m.hop) // 2
    x = torch.nn.functional.pad(x.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(x, m.n_fft, hop_length=m.hop, win_length=m.n_fft,
                      window=torch.hann_window(m.n_fft, dtype=dtype), center=False,
                      return_complex=True)
    mag = torch.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)
    fb = librosa.filters.mel(sr=m.sample_rate, n_fft=m.n_fft, n_mels=m.n_mels, fmin=0, fmax=m.f_max)
    mel = torch.from_numpy(fb).to(dtype) @ mag
    mel = mel.clamp(min=1e-5)
    return torch.log10(mel) if mode == "16k" else torch.log(mel)


def tones(length: int, sample_rate: int) -> torch.Tensor:
    """A chord and a chirp, (2, length), float64."""
    t = torch.arange(length, dtype=torch.float64) / sample_rate
    chord = (0.3 * torch.sin(2 * math.pi * 440 * t) + 0.2 * torch.sin(2 * math.pi * 1234.5 * t)
             + 0.1 * torch.sin(2 * math.pi * 5000 * t))
    chirp = 0.5 * torch.sin(2 * math.pi * (100 * t + 2000 * t * t))
    return torch.stack([chord, chirp])


@pytest.mark.parametrize("mode", MODES)
def test_filterbank_matches_librosa(mode):
    m = AUDIO_MODES[mode]
    ours = slaney_mel_filterbank(m.sample_rate, m.n_fft, m.n_mels, 0.0, m.f_max)
    ref = librosa.filters.mel(sr=m.sample_rate, n_fft=m.n_fft, n_mels=m.n_mels, fmin=0,
                              fmax=m.f_max)
    assert ours.dtype == np.float32 and ours.shape == (m.n_mels, m.n_fft // 2 + 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-10)
    mel = MelSpectrogram(mode)
    np.testing.assert_array_equal(mel.mel_basis.numpy(), ours)


def test_filterbank_other_geometry_matches_librosa():
    ours = slaney_mel_filterbank(22050, 512, 40, 50.0, 7000.0)
    ref = librosa.filters.mel(sr=22050, n_fft=512, n_mels=40, fmin=50.0, fmax=7000.0)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("length", [3000, 12345, 40000])
def test_random_waveform_matches_stft(mode, length):
    gen = torch.Generator().manual_seed(length)
    wave = 0.3 * torch.randn(2, length, generator=gen)
    wave[1, :100] = 1.7  # clipped samples: both clamp to [-1, 1]
    out = MelSpectrogram(mode)(wave)
    ref = reference_log_mel(wave, mode)
    assert out.shape == ref.shape == (2, AUDIO_MODES[mode].n_mels, length // AUDIO_MODES[mode].hop)
    assert rel_l2(out, ref) <= 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("length", [3000, 12345, 40000])
def test_tonal_waveform_matches_stft(mode, length):
    # tones over a -40 dB noise floor (pure tones: see the float32 conditioning test below)
    m = AUDIO_MODES[mode]
    gen = torch.Generator().manual_seed(length)
    wave = (tones(length, m.sample_rate)
            + 1e-2 * torch.randn(2, length, generator=gen, dtype=torch.float64)).float()
    assert rel_l2(MelSpectrogram(mode)(wave), reference_log_mel(wave, mode)) <= 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_algorithm_is_exact_in_float64(mode):
    # with a float64 basis the conv STFT equals torch.stft to rounding, even on pure tones
    m = AUDIO_MODES[mode]
    mel = MelSpectrogram(mode).double()
    mel.dft_basis = dft_basis(m.n_fft, dtype=torch.float64)
    wave = tones(12345, m.sample_rate)
    assert rel_l2(mel(wave), reference_log_mel(wave, mode, torch.float64)) <= 1e-11


@pytest.mark.parametrize("mode", MODES)
def test_pure_tones_float32_error(mode):
    # Pure tones leave bins that are pure cancellation; float32 rounding (of the basis here, of the
    # FFT in torch.stft) shows there at ~2e-5 relative for both implementations.
    m = AUDIO_MODES[mode]
    wave = tones(12345, m.sample_rate)
    exact = reference_log_mel(wave, mode, torch.float64)
    ours = rel_l2(MelSpectrogram(mode)(wave.float()), exact)
    theirs = rel_l2(reference_log_mel(wave.float(), mode), exact)
    assert ours <= 1e-4
    assert ours <= 3 * theirs


@pytest.mark.parametrize("mode,samples,frames", [("44k", 353280, 690), ("16k", 128000, 500)])
def test_eight_second_frame_count(mode, samples, frames):
    mel = MelSpectrogram(mode)
    lengths = sequence_lengths(mode, 8.0)
    assert lengths.audio_samples == samples and lengths.mel_frames == frames
    assert mel.num_frames(samples) == frames
    assert mel(torch.zeros(1, samples)).shape == (1, AUDIO_MODES[mode].n_mels, frames)


@pytest.mark.parametrize("mode", MODES)
def test_frame_count_formula(mode):
    mel = MelSpectrogram(mode)
    for length in (mel.pad + 1, 1000, 4095, 4096, 4097):
        assert mel.num_frames(length) == length // mel.hop
        assert mel(torch.zeros(1, length)).shape[-1] == length // mel.hop


def test_silence_hits_the_log_floor():
    out = MelSpectrogram("44k")(torch.zeros(1, 4096))
    assert torch.allclose(out, torch.full_like(out, math.log(1e-5)))
    out = MelSpectrogram("16k")(torch.zeros(1, 4096))
    assert torch.allclose(out, torch.full_like(out, -5.0))


def test_no_state_and_no_stft_op():
    mel = MelSpectrogram("16k")
    assert mel.state_dict() == {}  # constant tables are non-persistent buffers
    program = torch.export.export(mel, (torch.zeros(2, 4096),))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [op for op in ops if "stft" in op or "fft" in op], ops
    assert any("conv" in op for op in ops), ops


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown audio mode '22k'"):
        MelSpectrogram("22k")
    mel = MelSpectrogram("16k")
    with pytest.raises(ValueError, match=r"shape \(batch, samples\)"):
        mel(torch.zeros(4096))
    with pytest.raises(ValueError, match="more than 384 samples"):
        mel.num_frames(300)
