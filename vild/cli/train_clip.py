"""Pretrain the tiny CLIP teacher on synthetic captioned crops (vild-train-clip --out FILE), or score an existing one
on a world's boxes (vild-train-clip --teacher FILE --world DIR/world_info.json); tools/train_clip.py in a checkout."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def run(argv: list[str] | None = None) -> dict:
    """Parse arguments, pretrain (or load) a teacher, print the metrics as JSON."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="output/teacher/vild-tiny-clip.pt", help="where a new teacher is saved")
    p.add_argument("--teacher", default="", help="score this existing teacher file instead of pretraining one "
                   "(needs --world)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--num-pairs", type=int, default=16000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--world", default="", help="measure zero-shot accuracy on the boxes of this world: its "
                   "world_info.json or one of its lvis_*.json files")
    p.add_argument("--split", default="val", choices=("train", "val"), help="which of the world's images")
    p.add_argument("--novel", default=None, help='comma-separated names of the novel group (e.g. "star,heart"); '
                   'default: the categories whose frequency is "r" in the JSON')
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from ..synthetic.clip_pretrain import pretrain_teacher, region_zero_shot_accuracy

    if a.teacher:
        if not a.world:
            p.error("--teacher scores an existing teacher: pass --world DIR/world_info.json")
        if not Path(a.teacher).is_file():
            p.error(f"--teacher {a.teacher}: no such file")
        weights, m = a.teacher, {"path": a.teacher}
    else:
        weights = a.out
        m = pretrain_teacher(a.out, seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                             num_pairs=a.num_pairs, threads=a.threads)
    if a.world:
        novel = None if a.novel is None else [n.strip() for n in a.novel.split(",") if n.strip()]
        acc = region_zero_shot_accuracy(weights, a.world, split=a.split, novel_names=novel)
        m["novel_names"] = acc.pop("novel_names")
        m.update({f"region_acc_{k}": v for k, v in acc.items()})
    print(json.dumps(m, indent=1))
    return m


def main(argv: list[str] | None = None) -> int:
    """``vild-train-clip --out FILE`` or ``--teacher FILE --world DIR/world_info.json``: print the metrics."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
