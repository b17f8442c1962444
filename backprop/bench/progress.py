"""A progress bar when tqdm is installed, silence otherwise; messages that do not break the bar.

Whether the bar is drawn follows the rule of ``fit(progress=None)`` (:func:`backprop.progress.should_show`):
only on an interactive terminal and never when ``$CI`` is set, unless ``force=True``; ``enabled=False``
(``backprop-bench --no-progress``) turns it off.
"""

from __future__ import annotations

import sys
from typing import Any

from ..progress import should_show

__all__ = ["Progress"]


class Progress:
    """``update(n)`` advances ``n`` units of work; ``write(msg)`` prints above the bar (or to stderr).

    ``enabled=False``: no bar. Otherwise the bar is drawn where ``fit(progress=None)`` draws one (an
    interactive terminal outside CI, :func:`backprop.progress.should_show`), or always with ``force=True``
    (an explicit request, as ``fit(progress=True)``); never without tqdm.
    """

    def __init__(self, total: int, enabled: bool = True, force: bool = False) -> None:
        self._bar: Any = None
        if enabled and should_show(True if force else None):
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)

    @property
    def shown(self) -> bool:
        """Whether a bar is drawn."""
        return self._bar is not None

    def set_description(self, desc: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(desc, refresh=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def add_total(self, n: int) -> None:
        if self._bar is not None:
            self._bar.total += n
            self._bar.refresh()

    def write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
