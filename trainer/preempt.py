"""Preemption: SIGTERM or SIGUSR1 -> finish the current step, checkpoint, exit with `EXIT_PREEMPTED`.

A launcher loops on the exit code: 0 means training finished; `EXIT_PREEMPTED` (75, EX_TEMPFAIL
of sysexits.h: "try again later") means a complete checkpoint was written and the next start
resumes from it; anything else is an error. The signal may reach only some ranks (a node being
drained); the flag is combined over all ranks every step (`stop_requested` with a MAX
all-reduce piggy-backed on the step's statistics), so every rank stops after the same step.
"""

from __future__ import annotations

import signal

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 while installed; restores the previous handlers on `uninstall`."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionFlag:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> PreemptionFlag:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
