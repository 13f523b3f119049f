"""SIGTERM handling: Kubernetes, `docker stop` and preemption send SIGTERM, then SIGKILL after a grace
period. Outside the training loop there is nothing to save, so SIGTERM stops the process at once (exit
143). Inside it, the handler only raises a flag; the trainer callback (train.py) saves a checkpoint at
the end of the current step and stops, and the pipeline exits 143 without running later stages.
"""

from __future__ import annotations

import logging
import signal
import threading

from tuneserve.exitcodes import Terminated

log = logging.getLogger(__name__)

_requested = threading.Event()
_deferred = threading.Event()  # True while the training loop owns the response to SIGTERM


def requested() -> bool:
    return _requested.is_set()


def _handler(signum, frame):
    _requested.set()
    if _deferred.is_set():
        log.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting 143")
        return
    raise Terminated("stopped by SIGTERM before training started; nothing to save. Rerun to continue.")


def install() -> None:
    _requested.clear()
    signal.signal(signal.SIGTERM, _handler)


class deferred:
    """Context manager: while inside, SIGTERM sets the flag instead of stopping the process."""

    def __enter__(self):
        _deferred.set()
        return self

    def __exit__(self, *exc):
        _deferred.clear()
        return False
