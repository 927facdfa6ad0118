import json

import numpy as np
import pytest
import soundfile

from mmsep.train.data import (DataError, class_ids, draw_interferers, draw_window_starts,
                              mix_at_snr, read_clips)
from mmsep.train.synthetic import CLASSES, write_split

torch = pytest.importorskip("torch")


def test_corpus_is_deterministic(tmp_path, corpus):
    again = write_split(tmp_path, "val", 1, 2.0, seed=0)
    assert again.read_text() == corpus["val"].read_text()
    records = [json.loads(line) for line in again.read_text().splitlines()]
    assert [r["class"] for r in records] == list(CLASSES)
    for r in records:
        a, _ = soundfile.read(tmp_path / r["audio"])
        b, _ = soundfile.read(corpus["root"] / r["audio"])
        assert np.array_equal(a, b)
    other = write_split(tmp_path / "other", "val", 1, 2.0, seed=1)
    r = json.loads(other.read_text().splitlines()[0])
    a, _ = soundfile.read(other.parent / r["audio"])
    b, _ = soundfile.read(corpus["root"] / r["audio"])
    assert not np.allclose(a, b)


def test_read_clips(corpus):
    clips = read_clips(corpus["train"])
    assert len(clips) == 8 and clips[0].audio.is_file() and clips[0].video.is_file()
    assert class_ids(clips).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_texts_may_hold_any_character_that_json_leaves_unescaped(tmp_path):
    soundfile.write(tmp_path / "a.wav", np.zeros(100, np.float32), 44100)
    texts = ["dog\u2028barking", "a\x85b\x0bc\x1cd"]
    lines = [json.dumps({"audio": "a.wav", "text": t}, ensure_ascii=False) for t in texts]
    path = tmp_path / "list.jsonl"
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")  # Windows line ends too
    assert [c.text for c in read_clips(path)] == texts


@pytest.mark.parametrize("lines, message", [
    (['{"audio": "a.wav", "text": "x"}', "not json"], ":2: not valid JSON"),
    (['{"audio": "missing.wav", "text": "x"}', '{"audio": "a.wav", "text": "y"}'],
     ":1: audio file"),
    (['{"audio": "a.wav", "text": "x", "colour": 1}', '{"audio": "a.wav", "text": "y"}'],
     "unknown field(s) colour"),
    (['{"audio": "a.wav"}', '{"audio": "a.wav", "text": "y"}'], "needs a text label"),
    (['{"text": "x"}', '{"audio": "a.wav", "text": "y"}'], "needs a video and/or an audio"),
    (['{"audio": "a.wav", "text": "x", "class": "c"}'] * 2, "at least 2 classes"),
    (['{"audio": "a.wav", "text": "x"}'], "at least 2 clips"),
])
def test_bad_clip_lists(tmp_path, lines, message):
    soundfile.write(tmp_path / "a.wav", np.zeros(100, np.float32), 44100)
    path = tmp_path / "list.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        read_clips(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_mixtures_hit_the_snr_and_stay_in_range():
    gen = torch.Generator().manual_seed(0)
    target = 0.3 * torch.randn(3, 4000, generator=gen)
    noise = 0.2 * torch.randn(3, 4000, generator=gen)
    snr = torch.tensor([-15.0, 0.0, 15.0])
    t, mix = mix_at_snr(target.clamp(-0.6, 0.6), noise, snr)
    assert mix.abs().max() <= 1.0
    scale = t / target.clamp(-0.6, 0.6)  # one coefficient per item for target and mixture
    assert torch.allclose(scale, scale[:, :1].expand_as(scale), atol=1e-5)
    measured = 10 * torch.log10(t.pow(2).mean(1) / (mix - t).pow(2).mean(1))
    assert torch.allclose(measured, snr, atol=1e-3)
    assert scale[0, 0] < 1 and scale[2, 0] == 1  # the loud interferer made the mixture clip


def test_interferers_come_from_other_classes():
    classes = torch.tensor([0, 0, 1, 2, 2])
    targets = torch.arange(5).repeat(20)
    picked = draw_interferers(targets, classes, torch.Generator().manual_seed(0))
    assert (classes[picked] != classes[targets]).all()
    assert set(picked.tolist()) == set(range(5))


def test_window_starts_cover_each_clip_and_stay_inside_it():
    lengths = torch.tensor([100, 130, 90]).repeat(400)
    starts = draw_window_starts(lengths, 100, torch.Generator().manual_seed(0))
    assert starts.dtype == torch.int64
    assert (starts >= 0).all() and (starts + 100 <= lengths.clamp(min=100)).all()
    assert set(starts[0::3].tolist()) == {0} and set(starts[2::3].tolist()) == {0}
    assert set(starts[1::3].tolist()) == set(range(31))  # 0 to 30 inclusive, as randint
