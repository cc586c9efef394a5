"""Moved to :mod:`gradstats._files` (atomic writes are shared by the library and the CLI)."""

from gradstats._files import atomic_path, write_text_atomic

__all__ = ["atomic_path", "write_text_atomic"]
