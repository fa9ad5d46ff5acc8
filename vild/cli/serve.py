"""``vild-serve --weights model.pth``: the HTTP API and the web page on 127.0.0.1:8000."""
from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import sys
from pathlib import Path
from typing import Optional

from ..serve.limits import Limits
from .options import positive

# Only the standard library at import time, so setup errors are reported before torch loads.

API_KEY_ENV = "VILD_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    d = Limits()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", required=True, help="a vild checkpoint (e.g. tests/assets/demo_model/model.pth)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only; 0.0.0.0 = every network: set an API key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /detect and /info (default: ${API_KEY_ENV}, if set)")
    p.add_argument("--score-thresh", type=float, default=None,
                   help="requests' default score threshold (default: the checkpoint's calibrated display threshold)")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=positive, default=8, help="the most images per forward pass")
    g.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long a request may wait for others to share its forward pass")
    g.add_argument("--max-queue", type=positive, default=64, help="requests waiting; more get 503 + Retry-After")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds a request waits for its answer")
    g.add_argument("--vocab-cache", type=positive, default=64, help="vocabularies whose text embeddings are kept")
    g.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    lim = p.add_argument_group("limits per request")
    lim.add_argument("--max-bytes", type=positive, default=d.max_bytes, help="request body size")
    lim.add_argument("--max-pixels", type=positive, default=d.max_pixels, help="image width x height")
    lim.add_argument("--max-names", type=positive, default=d.max_names,
                     help="category names per vocabulary, synonyms included (LVIS: 1203 names and more synonyms)")
    lim.add_argument("--max-name-chars", type=positive, default=d.max_name_chars, help="characters per name")
    lim.add_argument("--max-detections", type=positive, default=d.max_detections,
                     help="detections per image: the default and the most a request may ask for")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Load the model and serve until interrupted; 2 = setup error."""
    args = build_parser().parse_args(argv)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    missing = [name for name, module in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                                         ("python-multipart", "python_multipart"))
               if importlib.util.find_spec(module) is None
               and not (module == "python_multipart" and importlib.util.find_spec("multipart"))]  # before 0.0.13
    if missing:
        print(f"error: vild-serve needs {', '.join(missing)}: pip install 'vild[serve]'", file=sys.stderr)
        return 2
    weights = Path(args.weights)
    if not weights.is_file():
        print(f"error: no checkpoint at {weights}: pass --weights model.pth (`make demo` trains a small one)",
              file=sys.stderr)
        return 2
    if not _is_loopback(args.host) and not api_key:
        print(f"warning: listening on {args.host} without an API key: anyone who reaches this port can use the "
              f"model; pass --api-key or set ${API_KEY_ENV}", file=sys.stderr)
    import torch
    import uvicorn

    from ..api import Detector
    from ..serve.app import create_app
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        det = Detector.from_checkpoint(weights, device=args.device, max_dets=args.max_detections,
                                       text_cache_size=args.vocab_cache)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    det.teacher.write_cache = False  # requests choose the names: no file per request vocabulary
    det.score_thresh = args.score_thresh if args.score_thresh is not None else det.display_score_thresh
    limits = Limits(args.max_bytes, args.max_pixels, args.max_names, args.max_name_chars, args.max_detections)
    app = create_app(det, limits, max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000,
                     max_queue=args.max_queue, timeout=args.timeout, api_key=api_key)
    print(f"model {weights} ({det.variant}) on {det.device}; score threshold {det.score_thresh:g}; "
          f"page and API at http://{_url_host(args.host)}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    sys.exit(main())
