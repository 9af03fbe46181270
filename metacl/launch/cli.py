"""`metacl sweep` and `metacl runs ls|compare`: many runs, locally or on Slurm."""
from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction) -> None:
    pass
