"""Warnings that point at the user's line, and deprecation of renamed arguments.

Python's ``stacklevel`` counts frames, which breaks as soon as a warning is issued from a helper
a few calls deep. :func:`warn` instead walks the stack to the first frame outside the gradstats
package, so the warning names the user's call (like pandas' ``find_stack_level``).
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["deprecated_alias", "user_stacklevel", "warn"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` of the first caller frame outside gradstats (for ``warnings.warn``)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_PACKAGE_DIR + os.sep):
            return level
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the user's line, not gradstats'."""
    # +1: user_stacklevel counts from warn()'s frame; warnings.warn counts from its caller (warn).
    warnings.warn(message, category, stacklevel=user_stacklevel())


def deprecated_alias(old: str, new: str, old_value: object, new_value: object, default: object):
    """Resolve a renamed keyword argument: return the value to use for ``new``.

    Both names default to ``None`` in the caller's signature, so that "not given" is told from
    "given, equal to the default". Passing both is an error; only the old one warns
    (``FutureWarning``) and forwards it; neither gives ``default``.
    """
    from gradstats.errors import ConfigurationError

    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        raise ConfigurationError(f"pass {new}= only ({old}= is its deprecated alias), not both")
    warn(f"{old}= is deprecated; use {new}= (same values)", FutureWarning)
    return old_value
