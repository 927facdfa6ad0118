"""Separator.process_many: requests share batches, and each gets what process() gives it.

Each request's noise is drawn from its own seed exactly as process() draws it. Alone, a request
gets process()'s samples bit for bit; batched with others, its windows go through the graphs in
calls of other batch sizes, and ONNX Runtime's CPU kernels are not bit-identical across batch
sizes (the mix encoder differs by ~2e-6 between a batch of 1 and of 2; rows are otherwise
independent of their neighbours and position), so those results are compared at float32
rounding level. process() alone has the same property across max_batch settings.
"""

import numpy as np
import pytest

from tests.helpers import rel_l2

from mmsep.runtime import InputError, Separator
from mmsep.runtime.example import tones


def _requests(sep, media):
    sr = sep.sample_rate
    return [
        {"mix": tones(3.0, sr, seed=1), "text": "a tone", "seed": 3, "steps": 2},
        {"mix": tones(1.0, sr, seed=2), "text": ["a tone", "noise"], "seed": 7, "steps": 2},
        {"text": "   ", "steps": 2},  # bad: fails alone
        {"video": media["av"], "text": "a dog", "seed": 5, "steps": 2},
        {"generate": True, "text": "rain", "seed": 9, "steps": 2, "duration": 1.0},
        {"mix": tones(2.0, sr, seed=4), "seed": 11, "steps": 3, "cfg": 2.0},  # its own group
    ]


@pytest.fixture(scope="module")
def small_batch_separator(model_dir):
    with Separator(model_dir, backend="ort-cpu", max_batch=4) as sep:
        yield sep


def test_each_request_matches_process_with_its_seed(small_batch_separator, media, monkeypatch):
    sep = small_batch_separator
    requests = _requests(sep, media)
    sizes = []
    real_sample = sep.backend.sample

    def counting_sample(x0, *args, **kwargs):
        sizes.append(len(x0))
        return real_sample(x0, *args, **kwargs)

    monkeypatch.setattr(sep.backend, "sample", counting_sample)
    results = sep.process_many(requests)
    monkeypatch.undo()
    assert isinstance(results[2], InputError) and str(results[2]) == "text is empty"
    for options, result in zip(requests, results):
        if isinstance(result, Exception):
            continue
        alone = sep.process(**options)
        assert result.mode == alone.mode and result.length == alone.length
        assert result.windows == alone.windows and result.items == alone.items
        assert rel_l2(result.audio, alone.audio) < 1e-5
        [single] = sep.process_many([options])
        np.testing.assert_array_equal(single.audio, alone.audio)
    # two groups (requests 0, 1, 3 and 4 agree on steps, cfg and negative text: generation
    # encodes its noise mixture like a real one, so it shares batches; 5 has its own steps),
    # each cut into batches of at most 4 items across its requests
    expected = []
    for group in ([0, 1, 3, 4], [5]):
        items = sum(results[i].items for i in group)
        expected += [4] * (items // 4) + ([items % 4] if items % 4 else [])
    assert sizes == expected and max(sizes) == 4


def test_sink_and_failing_media_stay_per_request(small_batch_separator, tmp_path):
    sep = small_batch_separator
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF0000WAVEjunk")
    got = {}
    requests = [{"mix": str(broken), "text": "x", "steps": 1},
                {"mix": tones(2.5, sep.sample_rate), "text": "x", "steps": 1, "seed": 2,
                 "sink": lambda k, s: got.setdefault(k, []).append(s)}]
    bad, good = sep.process_many(requests)
    assert isinstance(bad, InputError) and "broken.wav" in str(bad)
    assert good.audio is None
    alone = sep.process(**{**requests[1], "sink": None})
    np.testing.assert_array_equal(np.concatenate(got[0]), alone.audio[0])
