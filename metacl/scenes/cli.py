"""`metacl data scenes|preview`: generate and inspect the compositional-scenes dataset."""
from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction) -> None:
    pass
