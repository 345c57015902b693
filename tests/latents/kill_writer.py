"""A dataset writer that SIGKILLs itself at a chosen point: the subprocess of the preemption tests.

``python -m tests.latents.kill_writer URL --kill-at N`` writes the test dataset to URL and kills
itself (SIGKILL, as a preempted VM would die) just before the N-th call made from latents/ code
- a Python or C call: ``os.replace``, ``f.write``, ``fs.pipe_file``, ... - so every step of
publication is a possible point of death. ``--kill-at -1`` runs to the end and prints how many
such calls there were. A rerun skips the work if the card already exists, as the encode job does.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

STORAGE = str(Path(__file__).resolve().parents[2] / "latents" / "storage.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--samples", type=int, default=60)
    args = parser.parse_args()

    from latents.format import CARD_NAME
    from latents.storage import Root
    from tests.latents.conftest import make_samples, write_dataset

    samples = make_samples(args.samples)
    if Root(args.url).exists(CARD_NAME):
        return
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call") and frame.f_code.co_filename == STORAGE:
            if calls == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            calls += 1

    sys.setprofile(profile)
    threading.setprofile(profile)
    write_dataset(args.url, samples)
    sys.setprofile(None)
    print(calls)


if __name__ == "__main__":
    main()
