"""The embedded Shakespeare corpus and the text-file loader."""

import json
import re
from importlib import resources

import pytest
import torch

from gradstats.data import load_corpus, shakespeare_char, text_corpus


@pytest.fixture(scope="module")
def corpus():
    return shakespeare_char()


def test_embedded_corpus_matches_its_manifest(corpus):
    manifest = json.loads(
        resources.files("gradstats.data").joinpath("shakespeare_char.json").read_text()
    )
    assert len(corpus.train) == manifest["splits"]["train"]["chars"]
    assert len(corpus.val) == manifest["splits"]["val"]["chars"]
    assert corpus.vocab == manifest["vocab"]
    assert 60 <= corpus.vocab_size <= 65
    assert len(corpus.train) > 8 * len(corpus.val)  # the fixed 90/10 split


def test_embedded_corpus_is_in_speaker_line_style(corpus):
    head = corpus.decode(corpus.train[:2000])
    speeches = head.split("\n\n")[:-1]
    assert len(speeches) > 5
    for speech in speeches:
        assert re.fullmatch(r"[A-Za-z][A-Za-z' .,&-]*:\n(.+\n?)+", speech), speech
    assert set(corpus.vocab) <= set("\n !&',-.:;?") | set(map(chr, range(65, 91))) | set(
        map(chr, range(97, 123))
    )


def test_val_split_starts_a_speech(corpus):
    first_line = corpus.decode(corpus.val[:80]).split("\n")[0]
    assert first_line.endswith(":")


def test_batches_are_next_character_windows(corpus):
    x, y = corpus.batch("train", 4, 32, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32)
    assert x.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    x2, _ = corpus.batch("train", 4, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, x2)


def test_encode_decode_round_trip(corpus):
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
    assert corpus.decode(corpus.encode(text)) == text
    with pytest.raises(ValueError, match="not in the corpus vocabulary"):
        corpus.encode("café")


def test_text_file_corpus(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 10)
    corpus = text_corpus(path)
    assert corpus.vocab == "abcdefghij"
    assert len(corpus.train) == 90
    assert len(corpus.val) == 10
    assert corpus.decode(corpus.val) == "abcdefghij"
    assert load_corpus(str(path)).sha256 == corpus.sha256


def test_text_too_short_for_the_block_size(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("x" * 100)
    with pytest.raises(
        ValueError, match=r"val split of .* has 10 characters, fewer than block_size \+ 1 = 11"
    ):
        text_corpus(path).check_block_size(10)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        text_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        text_corpus(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="not UTF-8"):
        text_corpus(tmp_path / "bin.txt")
