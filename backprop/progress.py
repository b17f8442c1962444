"""When to draw a progress bar: the one rule shared by ``fit(progress=...)``, the scikit-learn estimators'
bars and ``backprop-bench``.

``True`` / ``False`` are obeyed as given; ``None`` ("auto") draws the bar only when standard error is an
interactive terminal and the environment variable ``CI`` is not set (``""``, ``0``, ``false`` and ``no``
count as not set), so a log file or a CI job never fills with bar redraws.

>>> from backprop.progress import should_show
>>> should_show(False)
False
"""

from __future__ import annotations

import os
import sys

import numpy as np

__all__ = ["in_ci", "should_show"]


def in_ci() -> bool:
    """True when the environment variable ``CI`` is set to anything but ``""``, ``0``, ``false`` or ``no``."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def stderr_is_terminal() -> bool:
    """Whether ``sys.stderr`` (where the bars are drawn) is an interactive terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed or detached stream
        return False


def should_show(progress: bool | None) -> bool:
    """Whether to draw a progress bar: ``True``/``False`` as given; ``None`` ("auto") only on an
    interactive terminal (``sys.stderr``) outside CI (see :func:`in_ci`)."""
    if progress is None:
        return stderr_is_terminal() and not in_ci()
    if not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be True, False or None (auto), got {progress!r}")
    return bool(progress)
