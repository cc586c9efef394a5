"""Import a script that is not a package module (``examples/*.py``, ``scripts/*.py``) in a test."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path) -> ModuleType:
    """The file at ``path`` executed as a module named after its stem and registered in
    ``sys.modules`` (dataclasses and pickling look their module up there); a fresh module
    every call."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` (see :func:`load_script`)."""
    return load_script(ROOT / "examples" / f"{name}.py")
