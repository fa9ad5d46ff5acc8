"""``vild-precompute`` (``tools/precompute_clip.py`` in a checkout): fill the CLIP proposal store."""
from __future__ import annotations

import argparse
import logging
import sys

from ..config import load_config, parse_args_with_overrides


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; KEY VALUE config overrides may follow them."""
    p = argparse.ArgumentParser(description="Embed M proposals per training image with the CLIP teacher into the "
                                            "proposal store. Parallel: torchrun --nproc_per_node N, or --shard i "
                                            "--num-shards n in separate processes. Re-running resumes.")
    p.add_argument("--config", required=True, help="the training config (dataset, teacher, store path)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="checkpoint of a model trained on base categories: its RPN proposes")
    src.add_argument("--proposals-json", help="COCO-results-style proposals: image_id, bbox (xywh), score")
    p.add_argument("--output", default="", help="store folder (default: DATASETS.PROPOSAL_STORE)")
    p.add_argument("--max-proposals", type=int, default=0, help="M (default: MODEL.VILD.NUM_DISTILL_PROPOSALS)")
    p.add_argument("--shard", type=int, default=None)
    p.add_argument("--num-shards", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides, KEY VALUE pairs")
    return p


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and write this process's shard of the store; its statistics."""
    args = parse_args_with_overrides(build_parser(), argv)
    cfg = load_config(args.config, args.opts)
    out = args.output or cfg.DATASETS.PROPOSAL_STORE
    if not out:
        raise SystemExit("no store folder: pass --output DIR or set DATASETS.PROPOSAL_STORE in the config")
    from ..engine.distributed import cleanup, init_distributed, resolve_device
    from ..engine.logger import setup_logger
    from ..engine.precompute import load_proposal_model, load_proposals_json, precompute_clip_proposals
    from ..teacher import CLIPTeacher
    from ..utils import comm
    device = resolve_device(cfg.MODEL.DEVICE)
    init_distributed(device)
    setup_logger(None, comm.get_rank())
    try:
        teacher = CLIPTeacher.from_config(cfg, device)
        m = args.max_proposals or cfg.MODEL.VILD.NUM_DISTILL_PROPOSALS
        model = load_proposal_model(args.weights, device) if args.weights else None
        props = load_proposals_json(args.proposals_json, m) if args.proposals_json else None
        stats = precompute_clip_proposals(cfg, teacher, out, model=model, proposals=props, max_proposals=m,
                                          shard_index=args.shard, num_shards=args.num_shards,
                                          batch_size=args.batch_size)
        logging.getLogger("vild").info("shard %d: wrote %d images", stats["shard"], stats["written"])
        return stats
    finally:
        cleanup()


def main(argv: list[str] | None = None) -> int:
    """``vild-precompute --config vild_r50.yaml --weights rpn.pth``: fill the CLIP proposal store."""
    run(argv)
    return 0


if __name__ == "__main__":  # torchrun --nproc_per_node N -m vild.cli.precompute ...
    sys.exit(main())
