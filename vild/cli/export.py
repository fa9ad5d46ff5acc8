"""``vild-export``: a vild checkpoint as ONNX files (0 = done, 2 = setup error)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

# Only the standard library at import time: setup errors are reported before torch loads.


def main(argv: Optional[list[str]] = None) -> int:
    """``vild-export --weights model.pth --out model.onnx``: the detector and its text tower as ONNX files."""
    p = argparse.ArgumentParser(description="Export a vild checkpoint to ONNX: the detector (any vocabulary, given "
                                            "as text embeddings at run time) and the teacher's text tower.")
    p.add_argument("--weights", required=True, help="a vild checkpoint (training or exported)")
    p.add_argument("--out", required=True, help="the detector file, e.g. model.onnx")
    p.add_argument("--text-out", help="the text tower file (default: beside --out, model.text.onnx)")
    p.add_argument("--no-text", action="store_true", help="skip the text tower (embed names with vild-embed instead)")
    a = p.parse_args(argv)
    try:
        from ..deploy.export import export_checkpoint
        written = export_checkpoint(a.weights, a.out, a.text_out, with_text=not a.no_text)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in written:
        print(f"wrote {f} ({f.stat().st_size / 2 ** 20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
