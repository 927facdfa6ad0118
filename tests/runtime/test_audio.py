"""Audio reading (soundfile and PyAV), downmix, resampling, mixture checks, atomic writing."""

import warnings

import numpy as np
import pytest
import soundfile as sf

from mmsep.runtime import audio
from mmsep.runtime.errors import InputError

SR = 44100


def sine(freq, seconds, rate, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("fmt,subtype,suffix", [("WAV", "PCM_16", ".wav"),
                                                ("FLAC", "PCM_24", ".flac"),
                                                ("OGG", "VORBIS", ".ogg")])
def test_read_formats_downmix_and_resample(tmp_path, fmt, subtype, suffix):
    rate = 48000
    left, right = sine(1000, 1.0, rate, 0.4), sine(1000, 1.0, rate, 0.2)
    path = tmp_path / f"stereo{suffix}"
    sf.write(path, np.stack([left, right], axis=1), rate, format=fmt, subtype=subtype)
    out = audio.read_audio(path, SR)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(out.size - SR) <= 1
    # mean of the channels, resampled: a 1 kHz sine of amplitude 0.3 at 44.1 kHz
    expected = sine(1000, 1.0, SR, 0.3)[:out.size]
    core = slice(2000, out.size - 2000)  # away from the resampler's edges
    tol = 2e-3 if fmt != "OGG" else 2e-2  # Vorbis is lossy
    assert np.max(np.abs(out[core] - expected[core])) < tol


def test_media_audio_track_via_pyav(media):
    out = audio.read_audio(media["av"], SR)  # AAC in MP4: not a libsndfile format
    assert abs(out.size / SR - 3.5) < 0.1
    spectrum = np.abs(np.fft.rfft(out[:SR]))
    freqs = np.fft.rfftfreq(SR, 1 / SR)
    peaks = sorted(freqs[np.argsort(spectrum)[-2:]])
    np.testing.assert_allclose(peaks, [330, 550], atol=2)  # both channels' tones survive
    pcm = audio.read_audio(media["pcm"], SR)  # PCM in MKV
    assert abs(pcm.size / SR - 1.5) < 0.05


def test_aac_end_padding_is_not_audio(media):
    """The last AAC frame decodes to 1024 samples, of which only its packet's duration are the
    track's: the mixture has the track's length, and the samples before the cut are unchanged."""
    import av

    with av.open(str(media["av"])) as container:
        stream = container.streams.audio[0]
        declared = round(float(stream.duration * stream.time_base) * stream.sample_rate)
        decoded = np.concatenate([f.to_ndarray().mean(axis=0) for f in container.decode(stream)])
    assert decoded.size > declared  # the encoder padded the last frame
    track = audio.MixtureStream(media["av"], stream.sample_rate, media=True)
    assert track.length == declared
    samples, _ = audio.read_audio_track(media["av"])
    np.testing.assert_allclose(samples[:, 0], decoded[:declared], atol=1e-7)


def test_no_audio_track_and_corrupt_files(tmp_path, media):
    with pytest.raises(InputError, match="silent.mp4: has no audio track"):
        audio.read_audio(media["silent_video"], SR)
    with pytest.raises(InputError, match="file not found"):
        audio.read_audio(tmp_path / "missing.wav", SR)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 10)
    with pytest.raises(InputError, match="junk.wav"):
        audio.read_audio(junk, SR)
    text = tmp_path / "notes.txt"
    text.write_text("not audio\n" * 100)
    # FFmpeg opens text as ANSI art (a video stream), so this one has no audio track
    with pytest.raises(InputError, match="notes.txt: (unreadable media file|has no audio track)"):
        audio.read_audio(text, SR)
    # a WAV whose format tag (0x1234) no decoder knows: FFmpeg opens it without a codec
    data = np.zeros(4410, np.int16).tobytes()
    fmt_chunk = b"fmt " + (16).to_bytes(4, "little") + b"".join(
        v.to_bytes(n, "little") for v, n in ((0x1234, 2), (1, 2), (SR, 4), (2 * SR, 4), (2, 2),
                                             (16, 2)))
    unknown = tmp_path / "unknown.wav"
    unknown.write_bytes(b"RIFF" + (4 + len(fmt_chunk) + 8 + len(data)).to_bytes(4, "little")
                        + b"WAVE" + fmt_chunk + b"data" + len(data).to_bytes(4, "little") + data)
    with pytest.raises(InputError, match="unknown.wav: unsupported audio codec"):
        audio.read_audio(unknown, SR)


def encode_mono(path, tone, rate: int, codec: str, container: str, sample_format: str,
                frame_samples: int):
    """``tone`` encoded by PyAV as a mono ``codec`` track in a ``container`` file."""
    import av

    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        for start in range(0, tone.size, frame_samples):
            frame = av.AudioFrame.from_ndarray(tone[None, start:start + frame_samples].copy(),
                                               format=sample_format, layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def test_a_track_whose_rate_changes_keeps_its_length(tmp_path):
    """Two ADTS AAC segments, 2 s at 44.1 kHz then 2 s at 22.05 kHz, joined as a capture that
    was cut and concatenated would be: frames at the second rate were taken as the first's
    (3.08 s, the second part at double speed)."""
    parts = []
    for rate in (44100, 22050):
        path = encode_mono(tmp_path / f"part{rate}.aac", sine(440, 2.0, rate, 0.3), rate,
                           "aac", "adts", "fltp", 1024)
        parts.append(path.read_bytes())
    joined = tmp_path / "joined.aac"
    joined.write_bytes(b"".join(parts))
    length = audio.MixtureStream(joined, SR).length / SR
    assert 4.0 < length < 4.2  # each segment's AAC priming and padding: about 0.07 s


def test_flac_in_matroska_keeps_its_last_samples(tmp_path):
    """Matroska's millisecond time base cannot say how long the last frame is to the sample:
    its rounding cut real samples off the end."""
    tone = sine(440, 2.0, SR)[:88323]
    path = encode_mono(tmp_path / "tone.mka", tone, SR, "flac", "matroska", "flt", 4096)
    np.testing.assert_allclose(audio.read_audio(path, SR), tone, atol=1e-4)


def test_clipping_warns_and_clips(tmp_path):
    data = sine(440, 0.5, SR, 1.5)
    path = tmp_path / "loud.wav"
    sf.write(path, data, SR, subtype="FLOAT")
    with pytest.warns(UserWarning, match=r"loud.wav: \d+ samples outside \[-1, 1\] were clipped"):
        out = audio.read_audio(path, SR)
    assert out.max() == 1.0 and out.min() == -1.0


def test_a_truncated_compressed_file_is_reported(tmp_path):
    """An MP3 cut in half: its header still says 3 s, the decoder stops at 1.4 s."""
    whole, cut = tmp_path / "whole.mp3", tmp_path / "cut.mp3"
    sf.write(whole, sine(440, 3.0, SR, 0.3), SR, format="MP3")
    data = whole.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        audio.MixtureStream(whole, SR)
    with pytest.warns(RuntimeWarning, match=r"cut.mp3: 1\.\d\d s decoded of the 3\.00 s its "
                                            r"header gives \(truncated or damaged\?\)"):
        stream = audio.MixtureStream(cut, SR)
    assert 1.0 < stream.length / SR < 2.0


def test_nan_rejected(tmp_path):
    data = sine(440, 0.5, SR)
    data[100] = np.nan
    data[200] = np.inf
    path = tmp_path / "nan.wav"
    sf.write(path, data, SR, subtype="FLOAT")
    with pytest.raises(InputError, match="nan.wav: 2 NaN or infinite audio samples"):
        audio.read_audio(path, SR)


def test_mixture_checks():
    with pytest.raises(InputError, match=r"0\.050 s long; the minimum is 0\.1 s"):
        audio.check_mixture(sine(440, 0.05, SR), SR, name="m")
    with pytest.raises(InputError, match="silent"):
        audio.check_mixture(np.zeros(SR, np.float32), SR, name="m")
    with pytest.raises(InputError, match="silent"):
        audio.check_mixture(np.full(SR, 1e-6, np.float32), SR, name="m")
    audio.check_mixture(sine(440, 0.1, SR, 1e-3), SR, name="m")


def test_array_prepare():
    stereo = np.stack([sine(440, 0.2, SR), -sine(440, 0.2, SR)], axis=1)
    assert not audio.prepare(stereo, SR, SR, name="a").any()  # opposite channels cancel
    with pytest.raises(InputError, match="floating point"):
        audio.prepare(np.zeros(10, np.int16), SR, SR, name="a")
    with pytest.raises(InputError, match="shape"):
        audio.prepare(np.zeros((2, 2, 2), np.float32), SR, SR, name="a")


@pytest.mark.parametrize("fmt,subtype", [("wav", "PCM_16"), ("wav", "FLOAT"), ("flac", "PCM_24")])
def test_write_atomic(tmp_path, fmt, subtype):
    data = sine(440, 0.3, SR, 1.2)
    path = tmp_path / f"out.{fmt}"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        audio.write_audio(path, data, SR, format=fmt, subtype=subtype)
    over = int(np.count_nonzero(np.abs(data) > 1))
    assert [str(w.message) for w in seen] == ([] if subtype == "FLOAT" else [
        f"{path}: {over} output samples outside [-1, 1] were clipped (the FLOAT subtype keeps "
        "them)"])
    back, rate = sf.read(path, dtype="float32")
    assert rate == SR and back.shape == data.shape
    if subtype == "FLOAT":
        np.testing.assert_array_equal(back, data)
    else:  # PCM is clipped, not wrapped around
        assert back.max() <= 1.0 and back.min() >= -1.0
        np.testing.assert_allclose(back, np.clip(data, -1, 1), atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_write_interrupted_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "out.wav"

    def broken(self, data):  # the file is open, its header already on disk
        raise KeyboardInterrupt

    monkeypatch.setattr(sf.SoundFile, "write", broken)
    with pytest.raises(KeyboardInterrupt):
        audio.write_audio(path, sine(440, 0.1, SR), SR)
    assert list(tmp_path.iterdir()) == []


def test_flac_float_rejected(tmp_path):
    with pytest.raises(InputError, match="FLAC cannot store FLOAT"):
        audio.write_audio(tmp_path / "x.flac", np.zeros(10, np.float32), SR, format="flac",
                          subtype="FLOAT")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("rate,target", [(48000, SR), (8000, 16000), (SR, 16000), (22050, SR),
                                         (SR, SR)])
def test_resampled_length_is_what_soxr_makes(rate, target):
    import soxr

    for frames in (1, 2, 7, 4799, 4800, 12345):
        made = soxr.resample(np.zeros(frames, np.float32), rate, target, quality="VHQ").size
        assert audio.resampled_length(frames, rate, target) == (frames if rate == target
                                                                 else made)


@pytest.mark.parametrize("fmt,subtype", [("wav", "PCM_16"), ("flac", "PCM_24"), ("wav", "FLOAT")])
@pytest.mark.filterwarnings("ignore:.*output samples outside")
def test_writer_in_pieces_equals_one_write(tmp_path, fmt, subtype):
    data = sine(440, 0.7, SR, 1.3)
    audio.write_audio(tmp_path / f"whole.{fmt}", data, SR, format=fmt, subtype=subtype)
    with audio.AudioWriter(tmp_path / f"pieces.{fmt}", SR, format=fmt, subtype=subtype) as out:
        for start in range(0, data.size, 5000):
            out.write(data[start:start + 5000])
    assert out.frames == data.size
    whole, _ = sf.read(tmp_path / f"whole.{fmt}", dtype="float32")
    pieces, rate = sf.read(tmp_path / f"pieces.{fmt}", dtype="float32")
    assert rate == SR
    np.testing.assert_array_equal(pieces, whole)
    with pytest.raises(InputError, match="FLAC cannot store FLOAT"):
        audio.AudioWriter(tmp_path / "x.flac", SR, format="flac", subtype="FLOAT")
    with pytest.raises(InputError, match="o.wav: cannot write"):
        audio.AudioWriter(tmp_path / "missing" / "x.wav", SR, name="o.wav")


def test_an_interrupt_inside_libsndfiles_write_is_the_interrupt(tmp_path, monkeypatch):
    """SIGTERM's KeyboardInterrupt can land in the Python callback libsndfile writes through,
    where cffi would print and drop it: it must come out as the interrupt, not a write error."""
    from mmsep.runtime import audio_writer

    open_file = audio_writer.open_output_file

    class Interrupted:
        def __init__(self, path):
            self.raw = open_file(path)

        def write(self, data):
            raise KeyboardInterrupt

        def __getattr__(self, name):
            return getattr(self.raw, name)

    monkeypatch.setattr(audio_writer, "open_output_file", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        with audio.AudioWriter(tmp_path / "o.wav", SR) as writer:
            writer.write(np.zeros(SR, np.float32))

