"""Fault injection for the fault tests and chaos drills: die where a crashing native decoder would.

``MEDXAI_FAULT_KILL_ON_SOURCE=<source key>`` makes the batch job SIGKILL itself when it starts to
decode that input (after the item's attempt marker is written), which is what an out-of-memory kill
or a segfault in a decoder looks like from the outside. Unset in production; it is read per item
so a drill can set it for one invocation only.
"""

from __future__ import annotations

import os
import signal

KILL_ON_SOURCE = "MEDXAI_FAULT_KILL_ON_SOURCE"


def before_decode(source_key: str) -> None:
    target = os.environ.get(KILL_ON_SOURCE)
    if target and target == source_key:
        os.kill(os.getpid(), signal.SIGKILL)
