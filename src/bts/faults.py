"""Fault injection for the crash tests: `BTS_FAULT_AT=<point>` kills this process with SIGKILL at <point>.

Points (the training loop, the pipeline and the atomic writer call `point(name)`):
    <phase>:<step>    start of that training step, e.g. seed:3, expert:code:2, stitch:1, routing:3, btx_top2:0;
                      <phase>:<steps> is after the last step (checkpoint written, model not yet saved)
    data:<domain>     after that domain's splits are written
    evaluate:<method> after that method's eval/<method>.json is written
    write:<file name> inside an atomic write: the temporary file is complete, the rename has not happened

SIGKILL, not an exception: nothing in the process gets to clean up, as with `kill -9` or the OOM killer.
Unset (the normal case) this costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "BTS_FAULT_AT"


def point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
