"""Sharing a network between threads.

Inference on an :class:`~backprop.MLP` (``forward``, ``predict``, ``loss``, ``loss_and_grads``, ...) needs no
lock: each thread runs its passes in workspaces of its own (:class:`backprop.step.Workspaces`), and the
parameters are only read. Changing a model (training it, replacing its parameters) is exclusive:
:func:`exclusive` lets one thread at a time in, and the same thread again (a callback of ``fit`` may call
``train_step``); another thread gets a :class:`ConcurrentTrainingError` at once, naming the call that holds
the model. A model whose every attribute a change replaces (a scikit-learn estimator's ``fit``) is read under
:func:`reading`: reads from any number of threads run together, a change waits for those under way, and a
read while another thread changes the model is refused the same way.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

__all__ = ["ConcurrentTrainingError", "exclusive", "holding", "reading"]

F = TypeVar("F", bound=Callable[..., Any])


class ConcurrentTrainingError(RuntimeError):
    """A thread tried to change (or read) a model that another thread is changing: training one model from
    two threads at once is refused, never interleaved."""


class _Hold:
    """Who holds one object: the changing thread (its ident, name, call and nesting depth), and the reads
    under way per thread."""

    __slots__ = ("depth", "name", "reads", "thread", "what")

    def __init__(self) -> None:
        self.thread: int | None = None
        self.name = self.what = ""
        self.depth = 0
        self.reads: dict[int, int] = {}


_cond = threading.Condition(threading.Lock())
#: each object's record, kept while the object lives (a change or read then finds it without making one)
_holds: weakref.WeakKeyDictionary[Any, _Hold] = weakref.WeakKeyDictionary()


def _hold(obj: Any, what: str, me: int) -> _Hold:
    """``obj``'s record (made on first use); :class:`ConcurrentTrainingError` when another thread changes it.
    Called with ``_cond`` held."""
    h = _holds.get(obj)
    if h is None:
        h = _holds[obj] = _Hold()
    elif h.thread is not None and h.thread != me:
        raise ConcurrentTrainingError(
            f"{what}: this {type(obj).__name__} is being changed by {h.what} in thread {h.name!r}; training or "
            "changing one model from two threads at once is not supported (train a copy, or wait for the "
            "other call to return)")
    return h


def _claim(obj: Any, what: str) -> _Hold:
    """Start a change of ``obj`` by the calling thread (see :func:`exclusive`); its record."""
    me = threading.get_ident()
    with _cond:
        h = _hold(obj, what, me)
        if h.thread is None:  # claimed before waiting: reads that start from now on are refused
            h.thread, h.name, h.what = me, threading.current_thread().name, what
            if h.reads and any(t != me for t in h.reads):
                _cond.wait_for(lambda: not any(t != me for t in h.reads))
        h.depth += 1
    return h


def _unclaim(h: _Hold) -> None:
    """End a change started by :func:`_claim`."""
    with _cond:
        h.depth -= 1
        if h.depth == 0:
            h.thread = None


@contextmanager
def exclusive(obj: Any, what: str) -> Iterator[None]:
    """Hold ``obj`` for the calling thread while the block runs (``what``: the call, named in errors).

    Re-entrant in the holding thread; another thread gets :class:`ConcurrentTrainingError` at once, before
    anything changes. Reads of ``obj`` under way in other threads (:func:`reading`) finish first."""
    h = _claim(obj, what)
    try:
        yield
    finally:
        _unclaim(h)


@contextmanager
def reading(obj: Any, what: str) -> Iterator[None]:
    """Read ``obj`` while the block runs: together with other threads' reads, never while another thread
    changes it (:class:`ConcurrentTrainingError` at once then)."""
    me = threading.get_ident()
    with _cond:
        h = _hold(obj, what, me)
        h.reads[me] = h.reads.get(me, 0) + 1
    try:
        yield
    finally:
        with _cond:
            left = h.reads[me] - 1
            if left:
                h.reads[me] = left
            else:
                del h.reads[me]
                _cond.notify_all()


def holding(what: str) -> Callable[[F], F]:
    """Decorate a function whose first argument is the model it changes: each call runs under
    :func:`exclusive` of that argument, named ``what`` in errors."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def held(obj: Any, *args: Any, **kwargs: Any) -> Any:
            h = _claim(obj, what)
            try:
                return fn(obj, *args, **kwargs)
            finally:
                _unclaim(h)

        return held  # type: ignore[return-value]

    return wrap
