#!/usr/bin/env python
"""Embed names: ``python tools/embed.py --weights model.pth --vocab "kite,unicycle" --out vocab.npz``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vild.cli.embed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
