#!/usr/bin/env python
"""Fill the CLIP proposal store: ``python tools/precompute_clip.py --config vild_r50.yaml --weights rpn.pth``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vild.cli.precompute import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
