"""Pretrain the tiny CLIP teacher on synthetic captioned crops: python tools/train_clip.py --out FILE."""
import argparse
import json
import logging

from vild.synthetic.clip_pretrain import pretrain_teacher


def main() -> None:
    """Parse arguments, pretrain, print the metrics as JSON."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="output/teacher/vild-tiny-clip.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--num-pairs", type=int, default=16000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--world", default="", help="also measure zero-shot accuracy on boxes of this "
                   "world's val split (lvis_val.json) through vild.teacher.CLIPTeacher")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    m = pretrain_teacher(a.out, seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                         num_pairs=a.num_pairs, threads=a.threads)
    if a.world:
        from vild.synthetic.clip_pretrain import region_zero_shot_accuracy
        m.update({f"region_acc_{k}": v for k, v in region_zero_shot_accuracy(a.out, a.world).items()})
    print(json.dumps(m, indent=1))


if __name__ == "__main__":
    main()
