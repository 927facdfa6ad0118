"""Long inputs in bounded memory: the mixture is read window by window, the output handed over as
it is joined and written incrementally; the results equal the whole-in-memory path."""

from fractions import Fraction

import av
import numpy as np
import pytest
import soundfile as sf

from mmsep.runtime import audio, audio_writer
from mmsep.runtime.cli import main
from mmsep.runtime.errors import InputError
from mmsep.runtime.example import make_video, tones
from mmsep.runtime.mux import mux
from mmsep.runtime.separator import Separator
from mmsep.runtime.windows import WindowPlan

SR = 44100


def noise(seconds, rate, channels=2, seed=0, amp=0.3):
    rng = np.random.default_rng(seed)
    return (amp * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32)


def write_m4a(path, data, rate):
    """Audio-only AAC in an MP4 container (not a libsndfile format: read through PyAV)."""
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = "stereo"
        planar = np.ascontiguousarray(data.T)
        for start in range(0, planar.shape[1], 4096):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar[:, start:start + 4096]),
                                               format="fltp", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def compare_windows(stream, whole, plan):
    worst = 0.0
    count = 0
    for w, window in stream.windows(plan):
        assert w == count and window.shape == (plan.window,) and window.dtype == np.float32
        worst = max(worst, float(np.max(np.abs(window - plan.cut(whole, w)))))
        count += 1
    assert count == plan.count
    return worst


@pytest.mark.parametrize("kind", ["wav", "flac", "m4a", "mp4 track"])
@pytest.mark.parametrize("target", [SR, 48000])
def test_stream_equals_whole_file(kind, target, tmp_path):
    """48 kHz stereo -> mono at the model rate (resampled, or not), window by window, against
    plan.cut(read_audio(...)). Small blocks put many block edges inside every window."""
    rate, data = 48000, noise(5.3, 48000)
    if kind == "wav":
        path = tmp_path / "mix.wav"
        sf.write(path, data, rate, subtype="FLOAT")
    elif kind == "flac":
        path = tmp_path / "mix.flac"
        sf.write(path, data, rate, subtype="PCM_24")
    elif kind == "m4a":
        path = write_m4a(tmp_path / "mix.m4a", data, rate)
    else:
        path = make_video(tmp_path / "clip.mp4", 4.0, fps=10, size=(32, 32), sample_rate=rate)
    whole = audio.read_audio(path, target)
    stream = audio.MixtureStream(path, target, block=3000, media=kind == "mp4 track")
    assert stream.length == whole.size and stream.source_rate == rate
    plan = WindowPlan(stream.length, 2 * target, target // 2, target)
    assert plan.count >= 3
    # soxr's streaming and one-shot resamplers run the same filter over the same input: they
    # agree to the last bit; 1e-6 leaves room for a float summation-order change in a future soxr
    assert compare_windows(stream, whole, plan) <= 1e-6
    # a window plus one resampled block (soxr hands its output over in bursts of up to ~1.5
    # blocks; PyAV blocks are whole decoded frames, up to 1024 samples more)
    assert stream.max_held <= plan.window + 2 * (3000 + 1024) * target / rate


def test_memory_stays_bounded_on_a_long_file(tmp_path):
    """Six minutes at 8 kHz, resampled to 16 kHz: the most samples held at once is about a window
    plus one block, not the length; every window still equals the whole-file result."""
    rate, target, block = 8000, 16000, 4096
    path = tmp_path / "long.wav"
    t = np.arange(6 * 60 * rate) / rate
    sf.write(path, (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), rate,
             subtype="FLOAT")
    blocks = []
    original = audio._soundfile_blocks

    def counted(*args):
        for b in original(*args):
            blocks.append(b.size)
            yield b

    stream = audio.MixtureStream(path, target, block=block)
    plan = WindowPlan(stream.length, 2 * target, target // 4, target)
    assert stream.length == 2 * t.size and plan.count > 200
    audio._soundfile_blocks = counted
    try:
        cuts = stream.windows(plan)
        next(cuts)
        assert sum(blocks) <= plan.window // 2 + 2 * block  # decoding stays just ahead
        whole = audio.read_audio(path, target)
        for w, window in cuts:
            np.testing.assert_array_equal(window, plan.cut(whole, w))
    finally:
        audio._soundfile_blocks = original
    assert max(blocks) == block * rate // target  # source frames that make ``block`` samples
    assert plan.window <= stream.max_held <= plan.window + 2 * block
    assert stream.max_held * 50 < stream.length


def test_a_file_stating_an_absurd_sample_rate_is_refused(tmp_path):
    """Its blocks would be upsampled by thousands (a 1 Hz header: 44100 samples per frame)."""
    sf.write(tmp_path / "one_hertz.wav", noise(0.5, 8000, channels=1)[:, 0], 1)
    for read in (audio.MixtureStream, audio.read_audio):
        with pytest.raises(InputError, match=r"one_hertz.wav: a sample rate of 1 Hz \(below "
                                              r"1000 Hz: a damaged file\?\)"):
            read(tmp_path / "one_hertz.wav", SR)


def test_checks_happen_in_the_scan(tmp_path):
    """NaN/Inf, clipping, length (at the model rate) and silence are known before any window."""
    data = noise(3.0, 22050, channels=1)[:, 0]
    data[40000] = np.nan
    sf.write(tmp_path / "nan.wav", data, 22050, subtype="FLOAT")
    with pytest.raises(InputError, match=r"nan.wav: 1 NaN or infinite audio samples"):
        audio.MixtureStream(tmp_path / "nan.wav", SR, block=1000)

    loud = tones(0.5, 22050) * 3
    sf.write(tmp_path / "loud.wav", loud, 22050, subtype="FLOAT")
    over = int(np.count_nonzero(np.abs(loud) > 1))
    with pytest.warns(UserWarning, match=rf"loud.wav: {over} samples outside \[-1, 1\]"):
        stream = audio.MixtureStream(tmp_path / "loud.wav", SR)
    stream.check()
    assert stream.peak == 1.0

    sf.write(tmp_path / "quiet.wav", np.zeros(22050, np.float32), 22050)
    stream = audio.MixtureStream(tmp_path / "quiet.wav", SR)
    with pytest.raises(InputError, match="quiet.wav: mixture is silent"):
        stream.check()

    # 0.1 s at 48 kHz is 4800 frames -> 4410 samples at 44.1 kHz; one frame less is too short
    for frames, ok in ((4800, True), (4799, False)):
        sf.write(tmp_path / "short.wav", tones(1.0, 48000)[:frames], 48000)
        stream = audio.MixtureStream(tmp_path / "short.wav", SR)
        assert stream.length == audio.read_audio(tmp_path / "short.wav", SR).size
        if ok:
            stream.check()
        else:
            with pytest.raises(InputError, match="the minimum is 0.1 s"):
                stream.check()


def test_file_changed_between_passes(tmp_path):
    path = tmp_path / "mix.wav"
    sf.write(path, tones(3.0, SR), SR)
    stream = audio.MixtureStream(path, SR)
    sf.write(path, tones(1.0, SR), SR)
    plan = WindowPlan(stream.length, SR, SR // 4, SR)
    with pytest.raises(InputError, match="changed while it was being read"):
        list(stream.windows(plan))


def test_separator_file_sink_equals_array(separator, tmp_path):
    """A mixture file (streamed) gives what its decoded array gives; with a sink the output comes
    in order, piece by piece, and is not kept."""
    path = tmp_path / "mix.flac"
    sf.write(path, noise(3.5, 48000), 48000, subtype="PCM_24")
    texts = ["a dog", "rain"]
    from_array = separator.process(mix=audio.read_audio(path, SR), text=texts, steps=1, seed=3)
    from_file = separator.process(mix=path, text=texts, steps=1, seed=3)
    np.testing.assert_array_equal(from_file.audio, from_array.audio)
    assert from_file.windows >= 3

    pieces = {0: [], 1: []}
    seen = []
    streamed = separator.process(mix=path, text=texts, steps=1, seed=3,
                                 sink=lambda k, samples: pieces[k].append(samples.copy()),
                                 progress=lambda done, total: seen.append(done))
    assert streamed.audio is None and streamed.windows == from_file.windows
    for k in (0, 1):
        assert len(pieces[k]) == streamed.windows  # one finalised run per joined window
        np.testing.assert_array_equal(np.concatenate(pieces[k]), from_file.audio[k])
    assert seen == list(range(1, streamed.batches + 1))


def test_failing_sink_stops_the_request(separator, tmp_path):
    path = tmp_path / "mix.wav"
    sf.write(path, tones(6.0, SR), SR)
    batches = []

    def sink(k, samples):
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        separator.process(mix=path, steps=1, sink=sink, progress=lambda d, t: batches.append(d))
    assert batches == []  # it stopped in the first batch


def test_mux_from_files_equals_mux_from_arrays(media, tmp_path):
    """Muxing reads a written (float) file in blocks and encodes exactly what the array gives."""
    track = tones(3.5, SR, seed=4) * 1.2  # some samples beyond full scale: clipped either way
    path = tmp_path / "stem.wav"
    sf.write(path, track, SR, subtype="FLOAT")
    from_array = mux(media["av"], track[None], SR, tmp_path / "a.mp4", titles=["x"])
    from_file = mux(media["av"], [path], SR, tmp_path / "f.mp4", titles=["x"])

    def packets(p):
        with av.open(str(p)) as container:
            return [(bytes(k), k.pts, k.stream.type) for k in container.demux()
                    if k.dts is not None]

    assert packets(from_file) == packets(from_array)
    with pytest.raises(InputError, match="expected mono audio at 48000 Hz"):
        mux(media["av"], [path], 48000, tmp_path / "bad.mp4")
    assert not (tmp_path / "bad.mp4").exists()


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_cli_writes_as_it_goes_and_equals_the_api(model_dir, separator, tmp_path, capsys,
                                                  monkeypatch):
    mix = tmp_path / "in" / "mix.wav"
    mix.parent.mkdir()
    sf.write(mix, noise(4.6, 48000), 48000, subtype="FLOAT")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    expected = separator.separate(mix=mix, steps=1, seed=2)
    sizes = []
    original = Separator._run_batch

    def watch(self, *args, **kwargs):
        partial = list(out_dir.glob(".o.partial-*.wav"))
        assert len(partial) == 1  # the output is open from the start, under its temporary name
        sizes.append(partial[0].stat().st_size)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Separator, "_run_batch", watch)
    code, _, stderr = run_cli(["--model", model_dir, "--mix", mix, "--steps", 1, "--seed", 2,
                               "--max-batch", 1, "--subtype", "FLOAT", "-o", out_dir / "o.wav",
                               "-q"], capsys)
    assert code == 0, stderr
    assert len(sizes) >= 3 and sizes == sorted(sizes) and sizes[-1] > sizes[0]  # grows per batch
    written, rate = sf.read(out_dir / "o.wav", dtype="float32")
    assert rate == SR
    np.testing.assert_allclose(written, expected, atol=1e-6)
    assert sorted(p.name for p in out_dir.iterdir()) == ["o.wav"]


@pytest.mark.parametrize("failure", ["interrupt", "disk full"])
def test_cli_failure_after_the_first_batch_leaves_nothing(failure, model_dir, media, tmp_path,
                                                          capsys, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    calls = []
    if failure == "interrupt":
        original = Separator._run_batch

        def run_batch(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # the first batch's samples are already in the temporary file
                assert list(out_dir.glob(".o.partial-*.wav"))[0].stat().st_size > 44
                raise KeyboardInterrupt
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Separator, "_run_batch", run_batch)
    else:
        original, open_file = audio.AudioWriter.write, audio_writer.open_output_file

        def write(self, samples):
            calls.append(1)
            return original(self, samples)

        class FillsUp:  # the disk is full from the second batch's samples on
            def __init__(self, path):
                self.raw = open_file(path)

            def write(self, data):
                if len(calls) >= 2:
                    raise OSError(28, "No space left on device")
                return self.raw.write(data)

            def __getattr__(self, name):
                return getattr(self.raw, name)

        monkeypatch.setattr(audio.AudioWriter, "write", write)
        monkeypatch.setattr(audio_writer, "open_output_file", FillsUp)
    code, _, stderr = run_cli(["--model", model_dir, "--video", media["av"], "--steps", 1,
                               "--max-batch", 1, "-q", "-o", out_dir / "o.wav", "--mux",
                               out_dir / "o.mp4"], capsys)
    assert len(calls) == 2
    if failure == "interrupt":
        assert code == 130 and "interrupted; nothing was written" in stderr
    else:
        assert code == 2 and stderr.strip() == \
            f"mmsep-run: error: {out_dir / 'o.wav'}: cannot write (No space left on device)"
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert list(out_dir.iterdir()) == []


def remux(source, target):
    """``source``'s streams copied packet for packet into ``target`` (its container by suffix)."""
    with av.open(str(source)) as inp, av.open(str(target), "w") as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        for packet in inp.demux():
            if packet.size:
                packet.stream = streams[packet.stream.index]
                out.mux(packet)
    return target


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_mux_copies_every_packet_of_a_matroska_video(media, tmp_path, suffix):
    """Matroska leaves the first packets' decode times unset where frames are reordered; every
    packet is still copied, in order, at its presentation time (the first group of pictures was
    dropped)."""
    source = remux(media["av"], tmp_path / "clip.mkv")

    def frames(path):
        with av.open(str(path)) as container:
            packets = [p for p in container.demux(container.streams.video[0]) if p.size]
            return [(bytes(p), float(p.pts * p.time_base)) for p in packets], \
                [p.dts for p in packets[:2]]

    want, first_dts = frames(source)
    assert first_dts == [None, None]  # the case: B-frames in Matroska
    got, _ = frames(mux(source, tones(3.0, SR, seed=1)[None], SR, tmp_path / f"out{suffix}"))
    assert [b for b, _ in got] == [b for b, _ in want]
    np.testing.assert_allclose([t for _, t in got], [t for _, t in want], atol=1e-3)
