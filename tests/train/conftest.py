"""Shared fixtures of the training tests: a tiny synthetic corpus, a random "pretrained" tiny
generation network with its companions in the release layout, and their feature cache."""

from __future__ import annotations

import pytest

from tests.helpers import TINY_SEED, TINY_WINDOW_SECONDS

torch = pytest.importorskip("torch")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """2 training clips and 1 validation clip per class (8 + 4), 2 s each."""
    from mmsep.train.synthetic import write_split

    root = tmp_path_factory.mktemp("corpus")
    return {"root": root, "train": write_split(root, "train", 2, TINY_WINDOW_SECONDS, seed=0),
            "val": write_split(root, "val", 1, TINY_WINDOW_SECONDS, seed=0)}


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory):
    """Random tiny components with a generation flow network at weights/mmaudio_tiny.pth."""
    import mmsep.models as mm

    root = tmp_path_factory.mktemp("weights")
    comps = mm.build_components("tiny", separation=False, duration=TINY_WINDOW_SECONDS,
                                seed=TINY_SEED)
    mm.save_components(comps, root)
    return root


@pytest.fixture(scope="session")
def encoders(weights_dir):
    from mmsep.train.features import load_encoders

    return load_encoders(weights_dir, "44k")


@pytest.fixture(scope="session")
def generator_net(weights_dir):
    import mmsep.models as mm

    return mm.load_flow(weights_dir / "weights/mmaudio_tiny.pth", duration=TINY_WINDOW_SECONDS)


@pytest.fixture(scope="session")
def tables(corpus, encoders, generator_net, tmp_path_factory):
    """The corpus's cached features as ClipTables, {"train": ..., "val": ...}."""
    from mmsep.train.data import SOURCE_PEAK, class_ids, read_clips
    from mmsep.train.features import build_cache, load_table

    cache = tmp_path_factory.mktemp("cache")
    lengths = generator_net.config.lengths
    empty = tuple(e[0] for e in generator_net.empty_conditions(1))
    result = {}
    for split in ("train", "val"):
        clips = read_clips(corpus[split])
        paths = build_cache(clips, encoders, lengths, cache,
                            source_peak=SOURCE_PEAK if split == "train" else None)
        result[split] = load_table(paths, class_ids(clips), empty)
    result["cache"] = cache
    return result
