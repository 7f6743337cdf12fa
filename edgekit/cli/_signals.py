"""SIGTERM and SIGINT for the ``edgekit`` command: a stop request, from the first line of ``main()`` on.

systemd and ``docker stop`` send SIGTERM at any moment, also while a command
is still importing, opening its store or connecting. :func:`install` is the
first thing ``main()`` does (before the subcommands and their imports are
loaded), so from then on a signal is never the default "terminate now":

* a command that stops by itself (``edgekit collect``, registered with
  ``graceful_stop=True``) polls :data:`STOP` and winds down: store and ack
  what arrived, print its counters, exit 0;
* any other command gets a ``KeyboardInterrupt`` (its cleanup runs, nothing
  half-written is left) and exits 130, as with Ctrl-C.

A signal that arrived before the handlers existed and was held pending (a
parent that started us with it blocked) is delivered when :func:`install`
unblocks it, and is handled like any other.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Dict

__all__ = ["STOP", "install", "restore"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Stop:
    """Set by a signal; plain attributes only, so the handler can never block or raise by surprise."""

    def __init__(self) -> None:
        self.requested = False
        self.signum = 0
        self.interrupt = False  # raise KeyboardInterrupt in the main thread (commands without a graceful stop)

    def __bool__(self) -> bool:
        return self.requested

    def raise_on_signal(self) -> None:
        """From now on a signal interrupts the main thread; at once if one came already."""
        self.interrupt = True
        if self.requested:
            raise KeyboardInterrupt


STOP = _Stop()


def _handler(signum: int, frame: Any) -> None:
    STOP.requested = True
    STOP.signum = signum
    if STOP.interrupt:
        raise KeyboardInterrupt


def install() -> Dict[int, Any]:
    """Handle SIGTERM and SIGINT as a stop request (call it first); the handlers it replaced.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    STOP.requested, STOP.signum, STOP.interrupt = False, 0, False
    previous = {sig: signal.signal(sig, _handler) for sig in _SIGNALS}
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    return previous


def restore(previous: Dict[int, Any]) -> None:
    """Put back what :func:`install` replaced (for callers of ``main([...])`` inside their own process)."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)
