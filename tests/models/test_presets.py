import pytest

from mmsep.models.presets import sequence_lengths


@pytest.mark.parametrize("mode, latent, samples, mel", [("44k", 345, 353280, 690),
                                                         ("16k", 250, 128000, 500)])
def test_eight_second_window_matches_design_table(mode, latent, samples, mel):
    lengths = sequence_lengths(mode)
    assert (lengths.latent, lengths.audio_samples, lengths.mel_frames) == (latent, samples, mel)
    assert (lengths.clip, lengths.sync_frames, lengths.sync_segments, lengths.sync) == \
        (64, 200, 24, 192)
    assert lengths.text == 77


def test_other_durations():
    ten = sequence_lengths("44k", 10.0)
    assert ten.latent == 431  # ceil(10 * 44100 / 1024)
    assert (ten.clip, ten.sync_frames, ten.sync_segments) == (80, 250, 30)
    with pytest.raises(ValueError, match="at least 2 s"):
        sequence_lengths("44k", 1.0)
    with pytest.raises(ValueError, match="unknown audio mode"):
        sequence_lengths("22k")
