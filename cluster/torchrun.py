"""`python -m cluster.torchrun ...`: torchrun whose agent ignores SIGUSR1.

Schedulers send their "checkpoint now" signal to every process of a job (SLURM's --signal) or
to the container's first process (Kubernetes). SIGUSR1 is the trainer's "finish the step,
checkpoint, exit 75" signal, but torchrun's agent has no handler for it and would die of it,
orphaning the ranks mid-checkpoint. Ignoring it here keeps the agent alive; the ranks install
their own handler (trainer/preempt.py), which replaces the inherited "ignore".
"""

from __future__ import annotations

import signal

from torch.distributed.run import main

if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    main()
