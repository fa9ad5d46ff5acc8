#!/usr/bin/env python
"""The HTTP API and web page: ``python tools/serve.py --weights model.pth [--host 127.0.0.1] [--port 8000]``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vild.cli.serve import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
