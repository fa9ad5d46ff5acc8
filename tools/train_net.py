#!/usr/bin/env python
"""Train or evaluate ViLD: ``python tools/train_net.py --config vild_r50.yaml [--eval-only] [KEY VALUE ...]``.

ViLD and ViLD-ensemble train from nothing in one command (proposal model, CLIP proposal store, distillation,
evaluation); own data: ``--train-json FILE --train-images DIR [--test-json ...] [--novel "a,b"]`` (docs/own_data.md).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vild.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
