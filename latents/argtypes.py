"""What every package's command line shares: the parser class, value types and lazy choices.

Exit statuses of `sit` (README, "Exit statuses"): 0 done; 1 a user error found while running
(a missing or damaged input, an output that holds something else), one line
``sit <command>: error: ...``; 2 a usage error in the command line itself (an unknown flag, a
value out of range), also one line, ``sit <command>: error: argument --flag: ...``, never the
usage block; 75 a preempted trainer (start it again); 130 interrupted.

Value types check ranges at the edge, so a bad number never reaches a job. `Lazy` holds choices
computed on first use: `sit --help` builds every subcommand's parser, and the choices of some
(the trainer presets) live in modules that import torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from enum import Enum
from typing import NoReturn, TypeVar

E = TypeVar("E", bound=Enum)

USAGE_ERROR = 2  # argparse's own status for a bad command line, kept for every usage error


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit `USAGE_ERROR`)."""

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        print(f"{self.prog}: error: {line} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(USAGE_ERROR)


class Lazy(Sequence):
    """A sequence computed on first use (argparse ``choices`` that live in heavy modules)."""

    def __init__(self, make: Callable[[], Sequence[str]]):
        self._make, self._items = make, None

    @property
    def items(self) -> Sequence[str]:
        if self._items is None:
            self._items = list(self._make())
        return self._items

    def __getitem__(self, i):
        return self.items[i]

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, value) -> bool:
        return value in self.items


def show_progress(quiet: bool) -> bool:
    """Progress bars only for a person watching: not with --quiet, not into a file or a pipe."""
    return not quiet and sys.stderr.isatty()


def _number(kind: type, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, not {text!r}"
        ) from None


def positive_int(text: str) -> int:
    value = _number(int, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(float, text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def fraction(text: str) -> float:
    value = _number(float, text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], not {text}")
    return value


def resolution(text: str) -> int:
    """An image side: a positive multiple of 8 (256 or 512 for ImageNet; smaller for trials)."""
    value = _number(int, text)
    if value <= 0 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 (256 or 512), not {text}")
    return value


def parse_choice(enum_cls: type[E], value: str | E) -> E:
    """A user string (any case) as an enum member, once at the edge; unknown values raise a
    ValueError listing the valid ones. The math modules take the members."""
    if isinstance(value, enum_cls):
        return value
    for member in enum_cls:
        if isinstance(value, str) and value.lower() == str(member.value).lower():
            return member
    valid = ", ".join(str(m.value) for m in enum_cls)
    raise ValueError(f"unknown {enum_cls.__name__} {value!r}; valid: {valid}")
