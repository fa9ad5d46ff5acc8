#!/usr/bin/env python
"""The synthetic shapes world (images + COCO/LVIS JSON): ``python tools/make_world.py --out DIR``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vild.cli.make_world import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
