"""Argument types shared by the commands (standard library only: the commands parse before torch loads)."""
from __future__ import annotations

import argparse


def positive(text: str) -> int:
    """An integer of at least 1 (``--batch-size``, ``--max-dets`` ...); argparse reports anything else."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
