"""`metacl data omniglot`: download and preprocess Omniglot."""
from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction) -> None:
    pass
