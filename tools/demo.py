#!/usr/bin/env python
"""The synthetic-world demo behind ``make demo``: world → tiny CLIP → ViLD-text / ViLD / ensemble / oracle → table."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vild.cli.demo import main  # noqa: E402

if __name__ == "__main__":
    # In a checkout the table is the one the README shows (its picture comes from benchmarks/trust.py).
    sys.exit(main(results_dir="benchmarks/results"))
