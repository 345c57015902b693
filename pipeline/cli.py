"""`sit encode`: encode an image dataset into a latent dataset (see pipeline/)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    pass
