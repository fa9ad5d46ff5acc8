#!/usr/bin/env python
"""Pretrain the tiny CLIP teacher (``python tools/train_clip.py --out FILE``) or score one
(``--teacher FILE --world DIR/world_info.json``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vild.cli.train_clip import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
