#!/usr/bin/env python
"""Train or evaluate ViLD: ``python tools/train_net.py --config vild_r50.yaml [--eval-only] [KEY VALUE ...]``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vild.engine.launch import main  # noqa: E402

if __name__ == "__main__":
    main()
