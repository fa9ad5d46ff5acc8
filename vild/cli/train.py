"""``vild-train`` (``tools/train_net.py`` in a checkout): parse, configure, then train or evaluate."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import CfgNode, load_config, parse_args_with_overrides


def train_argument_parser() -> argparse.ArgumentParser:
    """detectron2-style arguments: --config, --eval-only, --resume, --num-gpus, and KEY VALUE overrides (in any order)."""
    p = argparse.ArgumentParser(
        description="Train or evaluate ViLD. ViLD and ViLD-ensemble train in stages, each reused when done and "
                    "continued when interrupted (re-run the same command): a ViLD-text proposal model (or "
                    "PIPELINE.PROPOSAL_MODEL), the CLIP proposal store, distillation, evaluation. Multi-node: torchrun --nnodes N --nproc_per_node G "
                    "--rdzv_backend c10d --rdzv_endpoint HOST:PORT -m vild.cli.train --config ... "
                    "(or tools/train_net.py in a checkout)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "--config-file", dest="config", default="", help="YAML file, or a name in configs/")
    p.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS (or the last checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT_DIR")
    p.add_argument("--num-gpus", type=int, default=1, help="launch this many local processes with torchrun")
    own = p.add_argument_group("your own data (COCO-format json + image folder; or DATASETS.CUSTOM in a YAML)")
    own.add_argument("--train-json", default="", help="training annotations; registered as dataset custom_train")
    own.add_argument("--train-images", default="", help="folder file_name is relative to (default: the json's)")
    own.add_argument("--test-json", default="", help="evaluation annotations; registered as dataset custom_test "
                                                     "(without it, --train-json runs no evaluation)")
    own.add_argument("--test-images", default="", help="folder of the evaluation images (default: the json's)")
    own.add_argument("--novel", default=None, help='categories held out of training and scored as novel: '
                                                   '"cat,dog" (names or synonyms), or "none" (DATASETS.NOVEL)')
    p.add_argument("opts", nargs="*", metavar="KEY VALUE",
                   help="config overrides: KEY VALUE pairs, e.g. SOLVER.MAX_ITER 100 (flags may come between them)")
    return p


def setup_config(args: argparse.Namespace) -> CfgNode:
    """Defaults ← YAML ← overrides ← the own-data flags (--train-json, --test-json, --novel)."""
    cfg = load_config(args.config or None, args.opts)
    for split, json_file, images in (("train", args.train_json, args.train_images),
                                     ("test", args.test_json, args.test_images)):
        if not json_file:
            if images:
                raise SystemExit(f"--{split}-images needs --{split}-json, the annotations of those images")
            continue
        name = f"custom_{split}"
        cfg.DATASETS.CUSTOM.merge({name: {"JSON": json_file, "IMAGES": images or str(Path(json_file).parent),
                                          "TYPE": "coco", "SPLIT": "all"}}, allow_new=True)
        if split == "train":
            cfg.DATASETS.TRAIN = [name]
            if "DATASETS.PROPOSAL_STORE" not in args.opts[0::2]:  # a config's store holds another dataset's images
                cfg.DATASETS.PROPOSAL_STORE = ""
            cfg.DATASETS.TEST = [] if not args.test_json else cfg.DATASETS.TEST
        else:
            cfg.DATASETS.TEST = [name]
    if args.novel is not None:
        novel = [n.strip() for n in args.novel.split(",") if n.strip()]
        cfg.DATASETS.NOVEL = [] if [n.lower() for n in novel] == ["none"] else novel
    return cfg


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, then train or evaluate; the results (a SystemExit names a setup problem and its fix)."""
    args = parse_args_with_overrides(train_argument_parser(), argv)
    cfg = setup_config(args)  # fail on a bad config before spawning anything
    if args.eval_only and not cfg.MODEL.WEIGHTS:
        from ..engine.checkpoint import last_checkpoint
        if last_checkpoint(cfg.OUTPUT_DIR) is None:
            raise SystemExit(f"--eval-only: nothing to evaluate, as MODEL.WEIGHTS is empty and {cfg.OUTPUT_DIR} holds "
                             f"no checkpoint: pass MODEL.WEIGHTS path/to/model.pth")
    from ..engine.distributed import launched_by_torchrun, relaunch_with_torchrun
    if args.num_gpus > 1 and not launched_by_torchrun():
        relaunch_with_torchrun(args.num_gpus, list(sys.argv[1:] if argv is None else argv))
    from ..data.validate import DatasetError
    from ..engine.checkpoint import UnreadableCheckpoint
    from ..engine.launch import train_or_evaluate
    from ..engine.pipeline import StageMismatch
    try:
        return train_or_evaluate(cfg, eval_only=args.eval_only, resume=args.resume)
    except (UnreadableCheckpoint, DatasetError, StageMismatch) as e:  # the message names the file and the fix; a traceback hides it
        raise SystemExit(f"error: {e}") from None


def main(argv: list[str] | None = None) -> int:
    """``vild-train --config vild_r50.yaml [--eval-only] [--num-gpus N] [--train-json F ...] [KEY VALUE ...]``."""
    run(argv)
    return 0


if __name__ == "__main__":  # what --num-gpus relaunches under torchrun
    sys.exit(main())
