#!/usr/bin/env python
"""Export to ONNX: ``python tools/export.py --weights model.pth --out model.onnx`` (also writes model.text.onnx)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vild.cli.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
