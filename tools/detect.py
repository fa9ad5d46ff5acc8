#!/usr/bin/env python
"""Detect any vocabulary: ``python tools/detect.py --weights model.pth --vocab "kite,unicycle" --input IMG --output DIR``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vild.cli.detect import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
