"""Options for the child processes `darkroom dev` and the tests start (redis-server, web, worker)."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys
from typing import Any

_PR_SET_PDEATHSIG = 1


def _end_with_parent() -> None:
    """Runs in the child before exec: Linux sends it SIGTERM when its parent dies, however that happens."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def child_process_options() -> dict[str, Any]:
    """Popen options: the child has its own session, so a terminal's Ctrl-C reaches only the parent, which
    then stops its children once each, in order; and it never outlives the parent (no orphaned servers)."""
    options: dict[str, Any] = {"start_new_session": True}
    if sys.platform == "linux":
        options["preexec_fn"] = _end_with_parent
    return options
