#!/usr/bin/env python3
"""Set up the project's virtual environment once, then run the demo or the tests in it.

    python3 scripts/dev.py demo [ARGS...]   gradstats (pinned torch) -> `gradstats demo ARGS`
    python3 scripts/dev.py test [ARGS...]   + test tools, HF, RL, Lightning, docs tools, peers
                                            -> `python -m pytest ARGS`

Needs only python3 (>= 3.10) and pip. The venv is `.venv` next to this repository (override with
GRADSTATS_VENV). It is (re)installed only when pyproject.toml or requirements/ change — a hash
stamp inside the venv records what was installed — so a second run starts at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("GRADSTATS_VENV", ROOT / ".venv"))
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
PEERS = ROOT / "requirements" / "peers.txt"
STAMP = VENV / "gradstats-stamp.json"
INPUTS = [ROOT / "pyproject.toml", CONSTRAINTS, PEERS]

# profile -> pip install argument lists (each one `pip install` call)
PROFILES: dict[str, list[list[str]]] = {
    "demo": [["-c", str(CONSTRAINTS), "-e", str(ROOT)]],
    "test": [
        ["-c", str(CONSTRAINTS), "-e", f"{ROOT}[test,hf,bench,rl,integrations,docs]"],
        ["--no-deps", "-r", str(PEERS)],
    ],
}
SUPERSETS = {"demo": ("demo", "test"), "test": ("test",)}


def _bin(name: str) -> Path:
    return VENV / ("Scripts" if os.name == "nt" else "bin") / name


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for path in INPUTS:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure(profile: str) -> None:
    """Create the venv and install ``profile`` unless the stamp says it is already there."""
    stamp = json.loads(STAMP.read_text()) if STAMP.exists() else {}
    fingerprint = _fingerprint()
    if any(stamp.get(p) == fingerprint for p in SUPERSETS[profile]) and _bin("python").exists():
        return
    if not _bin("python").exists():
        print(f"[dev] creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print(
        f"[dev] installing the '{profile}' environment (about a minute the first time)", flush=True
    )
    for args in PROFILES[profile]:
        subprocess.run(
            [
                str(_bin("python")),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *args,
            ],
            check=True,
        )
    stamp = {p: v for p, v in stamp.items() if v == fingerprint}
    stamp[profile] = fingerprint
    STAMP.write_text(json.dumps(stamp))


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in PROFILES:
        print(__doc__, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    ensure(command)
    if command == "demo":
        cmd = [str(_bin("gradstats")), "demo", *rest]
    else:
        cmd = [str(_bin("python")), "-m", "pytest", *rest]
    os.chdir(ROOT)
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
