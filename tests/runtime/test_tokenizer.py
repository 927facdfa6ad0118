"""The torch-free CLIP tokenizer against open_clip's tokenizer for MMAudio's CLIP."""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmsep.runtime import tokenize
from mmsep.runtime.tokenizer import ClipTokenizer, VOCAB_FILE

REPO = Path(__file__).resolve().parents[2]

CASES = [
    "a dog barking",
    "",
    "   ",
    "Hello, World!!! How's it going? I'm fine; we'll see -- they'd've...",
    "A MAN Playing The Guitar",
    "3.14159 2024-05-01 100% #1 $9.99 @home",
    "café naïve résumé Ærøskøbing straße İstanbul ſ",
    "dog 🐕 barking 🔊🔊 👍🏽 👨‍👩‍👧",
    "狗在叫 犬が吠える 개가 짖는다",
    "tabs\tand\nnewlines   and\u00a0nbsp\u3000ideographic space",
    "rock &amp; roll &lt;b&gt; &quot;quoted&quot; &amp;amp; &#39;x&#39; &eacute;",
    "mojibake: cafÃ©, donâ€™t",
    "<start_of_text> literal special tokens <end_of_text>",
    "x" * 300,
    " ".join(["a very long caption"] * 40),
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "'s 're 've 'll 'd 'm 't 'S 'RE",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " \t\n\u00a0\u2009",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "éèêàäôöüçñßÅØæœİıſ",
        "😀🐕🎵👍🏽\u200d❤️", "狗吠叫音乐日本語한국어", "ÃƒÂ©â€™",
        "&amp;", "&lt;", "'s", "'ll", "<end_of_text>",
    ]
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 30)):
            if rng.random() < 0.1:
                parts.append(chr(rng.randint(1, 0x2FFFF)))  # anything, surrogates included
            else:
                parts.append(rng.choice(rng.choice(pools)))
        texts.append("".join(parts))
    return texts


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    open_clip = pytest.importorskip("open_clip")
    return open_clip.get_tokenizer("ViT-H-14-378-quickgelu")


def test_known_ids_without_open_clip():
    ids = tokenize("a dog barking")
    assert ids.dtype == np.int64 and ids.shape == (1, 77)
    assert ids[0, :5].tolist() == [49406, 320, 1929, 32676, 49407]
    assert not ids[0, 5:].any()
    assert tokenize([""])[0, :3].tolist() == [49406, 49407, 0]


def test_vocabulary():
    tok = ClipTokenizer()
    assert VOCAB_FILE.is_file()
    assert tok.vocab_size == 49408
    assert (tok.start_id, tok.end_id) == (49406, 49407)


def test_open_clip_uses_the_plain_lowercasing_tokenizer(open_clip_tokenizer):
    # The facts tokenize() relies on: no HF tokenizer, default "lower" cleaning, no reduction.
    import open_clip

    assert type(open_clip_tokenizer) is open_clip.tokenizer.SimpleTokenizer
    assert open_clip_tokenizer.clean_fn is open_clip.tokenizer._clean_lower
    assert open_clip_tokenizer.reduction_fn is None
    assert open_clip_tokenizer.context_length == 77


def test_matches_open_clip_on_hand_picked_cases(open_clip_tokenizer):
    ours = tokenize(CASES)
    ref = open_clip_tokenizer(CASES).numpy()
    for text, a, b in zip(CASES, ours, ref):
        assert a.tolist() == b.tolist(), text


def test_matches_open_clip_on_random_strings(open_clip_tokenizer):
    texts = _random_texts(400)
    np.testing.assert_array_equal(tokenize(texts), open_clip_tokenizer(texts).numpy())


def test_matches_open_clip_at_other_context_lengths(open_clip_tokenizer):
    texts = CASES + _random_texts(50, seed=1)
    for length in (2, 5, 16, 100):
        np.testing.assert_array_equal(tokenize(texts, context_length=length),
                                      open_clip_tokenizer(texts, context_length=length).numpy())


def test_length_counts_what_open_clip_would_write_without_a_limit(open_clip_tokenizer):
    texts = CASES + _random_texts(50, seed=2)
    mine = ClipTokenizer()
    wide = open_clip_tokenizer(texts, context_length=1000).numpy()  # nothing cut
    assert [mine.length(t) for t in texts] == np.count_nonzero(wide, axis=1).tolist()


def test_truncation_keeps_the_end_token():
    ids = tokenize(" ".join(["word"] * 200))[0]
    assert ids[0] == 49406 and ids[76] == 49407
    assert (ids[1:76] != 0).all() and (ids[1:76] != 49407).all()
    exact = tokenize(" ".join(["word"] * 75))[0]  # 75 words + start + end fill 77 exactly
    assert exact.tolist() == ids.tolist()


def test_bad_input_is_rejected():
    with pytest.raises(TypeError, match="string or a list of strings"):
        tokenize(42)
    with pytest.raises(TypeError, match="string or a list of strings"):
        tokenize(["ok", None])
    with pytest.raises(ValueError, match="context_length"):
        tokenize("ok", context_length=1)


def test_bad_vocabulary_file(tmp_path):
    with pytest.raises(ValueError, match="not_there.gz"):
        ClipTokenizer(tmp_path / "not_there.gz")


def test_runtime_import_does_not_need_torch():
    # Every attempt to import torch is recorded and fails, even one a library would catch.
    code = (
        "import sys\n"
        "attempts = []\n"
        "class BlockTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            attempts.append(name)\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, BlockTorch())\n"
        "import mmsep.runtime\n"
        "ids = mmsep.runtime.tokenize(['a dog barking', 'rain'])\n"
        "assert ids.shape == (2, 77) and ids[0, :5].tolist() == [49406, 320, 1929, 32676, 49407]\n"
        "assert not attempts, attempts\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
