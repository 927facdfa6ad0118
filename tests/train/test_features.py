import os
from pathlib import Path

import pytest

from mmsep.train import features
from mmsep.train.data import Clip, DataError, read_clips

torch = pytest.importorskip("torch")


def test_encode_posterior_matches_the_encoder_moments(encoders):
    vae = encoders.vae
    mel = encoders.mel(0.3 * torch.randn(2, 44100))
    mean, std = vae.encode_posterior(mel)
    moments = vae.encoder((mel - vae.data_mean) / vae.data_std)
    c = vae.latent_dim
    assert torch.equal(mean, vae.encode_mean(mel))
    assert torch.allclose(std, torch.exp(0.5 * moments[:, c:].clamp(-30, 20)))


def test_cached_features_have_the_network_shapes(tables, generator_net):
    c = generator_net.config
    train = tables["train"]
    window = c.lengths.audio_samples
    assert train.audio.shape[0] == 8 and (train.audio_len >= window).all()
    assert train.audio.shape[1] == train.audio_len.max() < 2 * window  # 2 s clips, 2 s windows
    assert train.clip_f.shape == (8, c.clip_seq_len, c.clip_dim)
    assert train.sync_f.shape == (8, c.sync_seq_len, c.sync_dim)
    assert train.text_f.shape == (8, c.text_seq_len, c.text_dim)
    assert train.video_exist.all() and train.text_exist.all()
    # same label, same text features; different videos, different clip features
    assert torch.equal(train.text_f[0], train.text_f[1])
    assert not torch.allclose(train.clip_f[0], train.clip_f[1])


def test_cache_resumes_and_keys_on_content(corpus, encoders, generator_net, tables, monkeypatch,
                                           tmp_path):
    clips = read_clips(corpus["val"])
    lengths = generator_net.config.lengths
    paths = features.build_cache(clips, encoders, lengths, tables["cache"], source_peak=None)
    before = [torch.load(p) for p in paths]
    paths[2].unlink()  # as if interrupted before the third clip
    computed = []
    original = features.clip_features
    monkeypatch.setattr(features, "clip_features",
                        lambda clip, *a, **k: computed.append(clip) or original(clip, *a, **k))
    again = features.build_cache(clips, encoders, lengths, tables["cache"], source_peak=None)
    assert again == paths and computed == [clips[2]]
    assert torch.equal(torch.load(paths[2])["clip_f"], before[2]["clip_f"])
    # another label is another entry; another window length too
    relabelled = [type(c)(c.audio, c.video, "something else", c.label) for c in clips[:1]]
    assert features.build_cache(relabelled, encoders, lengths, tables["cache"],
                                source_peak=None) != paths[:1]
    longer = type(lengths)(4.0, lengths.mode)
    assert features.cache_key(clips[0], encoders, longer, None) != paths[0].stem
    assert features.cache_key(clips[0], encoders, lengths, 0.95) != paths[0].stem
    assert not list(tables["cache"].glob(".*partial*"))


def test_cache_keys_follow_the_files_not_their_spelling(encoders, generator_net, tmp_path,
                                                        monkeypatch):
    """The same relative name in another folder, or a file rewritten in place, is another
    entry; another spelling of the same file is the same entry."""
    lengths = generator_net.config.lengths
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "clip.wav").write_bytes(b"one")

    def key(path):
        return features.cache_key(Clip(path, None, "a dog", None), encoders, lengths, None)

    first = key(tmp_path / "a" / "clip.wav")
    monkeypatch.chdir(tmp_path / "b")
    assert key(Path("clip.wav")) != first
    monkeypatch.chdir(tmp_path / "a")
    assert key(Path("clip.wav")) == key(Path("../a/./clip.wav")) == first
    os.utime("clip.wav", ns=(1, 1))  # same size, another modification time
    assert key(Path("clip.wav")) != first
    with pytest.raises(DataError, match="gone.wav: cannot read"):
        key(Path("gone.wav"))


def test_an_empty_audio_file_is_refused(encoders, generator_net, tmp_path):
    import numpy as np
    import soundfile

    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(DataError, match="empty.wav: no audio samples"):
        features.clip_features(Clip(empty, None, "a dog", None), encoders,
                               generator_net.config.lengths, source_peak=0.95)


def test_a_clip_keeps_two_windows_of_audio_and_the_table_pads_them(encoders, generator_net,
                                                                   tmp_path):
    """Two windows at most are cached (where interferer windows start); a short clip is padded
    to one window; the table pads every clip to the longest and cuts windows at any start."""
    import numpy as np
    import soundfile

    lengths = generator_net.config.lengths
    window, rate = lengths.audio_samples, lengths.mode.sample_rate
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, int(2.5 * window)).astype(np.float32)
    entries = []
    for name, samples in (("long.wav", wave), ("short.wav", wave[:window // 2])):
        soundfile.write(tmp_path / name, samples, rate, subtype="FLOAT")
        clip = Clip(tmp_path / name, None, "a dog", None)
        entries.append(features.clip_features(clip, encoders, lengths, source_peak=None))
        torch.save(entries[-1], tmp_path / f"{name}.pt")
    long, short = (e["audio"].numpy() for e in entries)
    np.testing.assert_array_equal(long, wave[:2 * window])
    np.testing.assert_array_equal(short[:window // 2], wave[:window // 2])
    assert short.shape == (window,) and not short[window // 2:].any()
    empty = tuple(e[0] for e in generator_net.empty_conditions(1))
    table = features.load_table([tmp_path / "long.wav.pt", tmp_path / "short.wav.pt"],
                                torch.tensor([0, 1]), empty)
    assert table.audio.shape == (2, 2 * window) and table.audio_len.tolist() == [2 * window,
                                                                                window]
    assert not table.audio[1, window:].any()
    cut = table.windows(torch.tensor([0, 0, 1]), torch.tensor([0, window, 0]), window)
    np.testing.assert_array_equal(cut.numpy(), np.stack([wave[:window], wave[window:2 * window],
                                                         short]))


def test_training_sources_are_scaled_to_the_authors_peak(encoders, generator_net, tmp_path):
    """The whole file (stereo, at another rate) is downmixed and scaled to peak 0.95 before
    resampling, without clipping what was above 1; without a peak the level stays; a silent
    training source is refused by name."""
    import numpy as np
    import soundfile
    import soxr

    lengths = generator_net.config.lengths
    rate = lengths.mode.sample_rate
    frames = 5 * 32000 * lengths.audio_samples // (2 * rate)  # 2.5 windows at 32 kHz
    stereo = np.random.default_rng(1).uniform(-0.2, 0.2, (frames, 2)).astype(np.float32)
    stereo[-1] = 1.6  # the loudest sample lies past the two cached windows, and above 1
    path = tmp_path / "loud.wav"
    soundfile.write(path, stereo, 32000, subtype="FLOAT")
    clip = Clip(path, None, "a dog", None)
    mono = stereo.astype(np.float64).mean(axis=1)
    scaled = soxr.resample((mono * 0.95 / 1.6).astype(np.float32), 32000, rate, quality="VHQ")
    got = features.clip_features(clip, encoders, lengths, source_peak=0.95)["audio"].numpy()
    np.testing.assert_allclose(got, scaled[:got.size], atol=1e-6)
    kept = features.clip_features(clip, encoders, lengths, source_peak=None)["audio"].numpy()
    level = soxr.resample(np.clip(mono, -1, 1).astype(np.float32), 32000, rate, quality="VHQ")
    np.testing.assert_allclose(kept, level[:kept.size], atol=1e-6)
    soundfile.write(tmp_path / "quiet.wav", np.zeros(rate, np.float32), rate)
    with pytest.raises(DataError, match=r"quiet.wav: silent .*no sound to scale to peak 0.95"):
        features.clip_features(Clip(tmp_path / "quiet.wav", None, "a dog", None), encoders,
                               lengths, source_peak=0.95)
