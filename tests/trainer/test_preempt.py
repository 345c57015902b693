"""The preemption flag: SIGTERM and SIGUSR1 set it; the previous handlers come back afterwards."""

from __future__ import annotations

import os
import signal

import pytest

from trainer.preempt import EXIT_PREEMPTED, SIGNALS, PreemptionFlag


@pytest.mark.parametrize("sig", SIGNALS)
def test_signal_sets_the_flag_and_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    with PreemptionFlag() as flag:
        assert not flag.requested
        os.kill(os.getpid(), sig)
        assert flag.requested and flag.signal == sig
    assert signal.getsignal(sig) == before
    assert EXIT_PREEMPTED == 75  # documented in README and `sit train --help`
