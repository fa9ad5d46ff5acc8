"""Generate the synthetic shapes world (images + COCO/LVIS JSON): vild-make-world --out DIR (tools/make_world.py in a
checkout)."""
from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and write the world."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="output/world")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=600)
    p.add_argument("--num-val", type=int, default=150)
    p.add_argument("--image-size", type=int, default=128)
    a = p.parse_args(argv)
    from ..synthetic.world import generate_world

    t = time.time()
    w = generate_world(a.out, seed=a.seed, num_train=a.num_train, num_val=a.num_val,
                       image_size=a.image_size)
    print(json.dumps({k: w[k] for k in ("lvis_train", "lvis_val", "coco_train", "coco_val",
                                        "novel_names")}, indent=1))
    print(f"world written to {a.out} in {time.time() - t:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
