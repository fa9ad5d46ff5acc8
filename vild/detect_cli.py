"""``tools/detect.py``: run a trained ViLD over images, folders, globs or videos with any vocabulary."""
from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import json
import os
import sys
import tempfile
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Optional

# Only the standard library at import time, so setup errors are reported before torch loads.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
_KEEP_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
NO_MODEL_HINT = ("train one first: `make demo` trains a small model on the synthetic world, "
                 "tools/train_net.py trains on real data; or pass --weights model.pth")


class CLIError(Exception):
    """A problem with the command line or its files, reported without a traceback."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", help="checkpoint; default: the newest model_*.pth under $VILD_OUTPUT or ./output")
    p.add_argument("--input", required=True, help="an image, a folder of images, a glob (quote it) or a video")
    p.add_argument("--output", required=True, help="folder for annotated images/videos (and detections.json)")
    v = p.add_mutually_exclusive_group()
    v.add_argument("--vocab", help='categories: "kite,unicycle", synonyms with "|": "couch|sofa,tv"')
    v.add_argument("--vocab-file", help="one category per line (synonyms with |, # comments)")
    v.add_argument("--vocab-preset", choices=("coco", "coco_ovd", "lvis"))
    p.add_argument("--score-thresh", type=float, default=None,
                   help="drop detections scoring below this; default: the checkpoint's calibrated threshold, "
                        "else 0.5 (text, vild) or 0.35 (ensemble, whose novel-category scores are smaller)")
    p.add_argument("--max-dets", type=_positive, default=100, help="detections kept per image")
    p.add_argument("--per-class-nms", action="store_true",
                   help="NMS per category, so that one box may carry several labels (default: one label per box)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="onnx: --weights is a vild-export model.onnx, run by onnxruntime (see docs/deploy.md)")
    p.add_argument("--batch-size", type=_positive, default=4, help="images per forward pass")
    p.add_argument("--json", action="store_true", help="also write detections.json (COCO results format)")
    p.add_argument("--coco-gt", help="with --json: take image and category ids from this COCO annotation file")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Run detection; 0 = all inputs done, 1 = some inputs failed, 2 = nothing run (setup error)."""
    args = build_parser().parse_args(argv)
    try:
        out_dir = _writable_folder(Path(args.output))
        images, videos = collect_inputs(args.input)
        vocab = _vocabulary(args)
        weights = Path(args.weights) if args.weights else _newest_or_fail()
        from .api import Detector  # heavy (torch, CLIP): after the cheap checks
        if args.backend == "onnx":
            from .deploy.runner import OnnxDetector
            det = OnnxDetector(weights, device=args.device, vocabulary=vocab, max_dets=args.max_dets,
                               batch_size=args.batch_size)
        else:
            det = Detector.from_checkpoint(weights, device=args.device, vocabulary=vocab, max_dets=args.max_dets,
                                           batch_size=args.batch_size, per_class_nms=args.per_class_nms)
        det.score_thresh = args.score_thresh if args.score_thresh is not None else det.display_score_thresh
        ids = _IdMapper(args.coco_gt, det.names) if args.json else None
    except (CLIError, OSError, ValueError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model {weights} ({det.variant}) on {det.device}; {len(det.names)} categories "
          f"({sum(det.base_mask)} base); score threshold {det.score_thresh:g}"
          f"{'' if det.has_masks else '; boxes only (a model trained without masks)'}", file=sys.stderr)
    from .utils.atomic import atomic_open  # imports torch: after the cheap checks, like the Detector
    # results stream into a hidden file that replaces detections.json when all inputs are done: memory stays
    # flat over a folder of 100k photos, and an interrupted run leaves the previous file as it was
    with atomic_open(out_dir / "detections.json") if ids is not None else contextlib.nullcontext() as results:
        run = _Run(det, out_dir, ids, taken={p.resolve() for p in images + videos}, results=results)
        run.images(images)
        for v in videos:
            run.video(v)
        run.finish()
    print(run.summary())
    return 1 if run.failures else 0


# ---- inputs ------------------------------------------------------------------------------------
def collect_inputs(spec: str) -> tuple[list[Path], list[Path]]:
    """Images and videos named by a file, a folder (its image files) or a glob, sorted."""
    p = Path(spec).expanduser()
    known = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in known)
    elif p.is_file():
        files = [p]
    elif glob.has_magic(spec):  # like a folder: "dir/*" means its images and videos, not its notes.txt
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(spec), recursive=True)
                       if os.path.isfile(f) and Path(f).suffix.lower() in known)
    else:
        raise CLIError(f"input {spec} does not exist")
    if not files:
        raise CLIError(f"no image or video files in {spec}")
    videos = [f for f in files if f.suffix.lower() in VIDEO_EXTENSIONS]
    return [f for f in files if f not in videos], videos


def find_newest_checkpoint(root: Path) -> Optional[Path]:
    """The most recently written model_*.pth (model_final.pth included) anywhere under ``root``."""
    found = [p for p in root.rglob("model_*.pth") if p.is_file()] if root.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _newest_or_fail() -> Path:
    root = Path(os.environ.get("VILD_OUTPUT") or "output")
    path = find_newest_checkpoint(root)
    if path is None:
        raise CLIError(f"no --weights given and no trained model (model_*.pth) under {root}: {NO_MODEL_HINT}")
    print(f"no --weights given: using the newest checkpoint under {root}: {path}", file=sys.stderr)
    return path


def _vocabulary(args: argparse.Namespace) -> Optional[list]:
    # typed names are lenient: a repeat ("star,Star") is dropped with a warning, as the Detector does for a string
    from .api import _dedupe_case_insensitive
    if args.vocab is not None:
        from .teacher.vocabulary import parse_vocabulary
        return _dedupe_case_insensitive(parse_vocabulary(args.vocab))
    if args.vocab_file:
        from .teacher.vocabulary import load_vocabulary_file
        return _dedupe_case_insensitive(load_vocabulary_file(args.vocab_file))
    if args.vocab_preset:
        from .vocab_presets import get_preset
        return get_preset(args.vocab_preset)
    return None  # the checkpoint's training vocabulary


def _writable_folder(path: Path) -> Path:
    """Create ``path`` and prove a file can be written there, before any work is done."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise CLIError(f"output folder {path} cannot be written: {e.strerror or e}") from None
    return path


# ---- ids for COCO results -----------------------------------------------------------------------
class _IdMapper:
    """Image and category ids: from a COCO ground-truth file, else input order and vocabulary order (from 1)."""

    def __init__(self, gt_path: Optional[str], names: list[str]):
        self.by_file: Optional[dict[str, int]] = None
        self.unmatched: set[Path] = set()  # inputs whose file name the ground truth does not list
        self.category_ids = list(range(1, len(names) + 1))
        if not gt_path:
            return
        from .api import _key
        gt = json.loads(Path(gt_path).read_text())
        # LVIS images name their file only in coco_url
        self.by_file = {Path(im.get("file_name") or im.get("coco_url", "")).name: im["id"] for im in gt["images"]}
        cats = {_key(c["name"]): c["id"] for c in gt["categories"]}
        missing = [n for n in names if _key(n) not in cats]
        if missing:
            raise CLIError(f"categories not in {gt_path}: {missing[:10]}; use the ground truth's names")
        self.category_ids = [cats[_key(n)] for n in names]

    def image_id(self, path: Path, fallback: int) -> Optional[int]:
        """The ground truth's id for this file (None if absent), or ``fallback`` without ground truth."""
        if self.by_file is None:
            return fallback
        found = self.by_file.get(path.name)
        if found is None:
            self.unmatched.add(path)  # a video's frames count once
        return found


# ---- running -----------------------------------------------------------------------------------
class _Run:
    """Feeds batches to the detector, writes outputs, and keeps the tallies for the summary."""

    def __init__(self, det, out_dir: Path, ids: Optional[_IdMapper], taken: set, results: Optional[IO] = None):
        """``results`` (a text file) receives the COCO results as a JSON list, written as they come."""
        self.det, self.out_dir, self.ids, self.taken = det, out_dir, ids, set(taken)
        self.failures: list[tuple[Path, str]] = []
        self.num_detections = 0
        self.num_images = self.num_frames = self.num_videos = 0
        self.next_id = 1
        self._results = results
        if results is not None:
            results.write("[")

    def _add(self, dets: list[dict]) -> None:
        for d in dets:
            if self._results is not None:
                self._results.write(("," if self.num_detections else "") + json.dumps(d))
            self.num_detections += 1

    def finish(self) -> None:
        """Close the results' JSON list."""
        if self._results is not None:
            self._results.write("]")

    def images(self, paths: list[Path]) -> None:
        """Detect in every readable image; report the others by path and go on.

        I/O threads keep the model busy: they read the next batch while the model runs, and draw, write and
        RLE-encode the previous batches (decoding, drawing and encoding release the GIL). Results are recorded
        in input order.
        """
        from tqdm import tqdm

        from .io import ImageReadError, read_image

        def read(path: Path):
            try:
                return read_image(path)
            except ImageReadError as e:
                return e

        bar = tqdm(total=len(paths), unit="img", desc="detect", file=sys.stderr)
        bs = self.det.batch_size
        with ThreadPoolExecutor(max_workers=3, thread_name_prefix="vild-detect-io") as pool:
            todo, reads, writes, batch = iter(paths), deque(), [], []
            for path in itertools.islice(todo, 2 * bs):  # reads run up to two batches ahead
                reads.append((path, pool.submit(read, path)))
            while reads:
                path, future = reads.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    reads.append((nxt, pool.submit(read, nxt)))
                image = future.result()
                image_id, self.next_id = self.next_id, self.next_id + 1  # unreadable files use up an id too
                if isinstance(image, ImageReadError):
                    self._fail(path, image.reason, str(image), bar)
                    bar.update(1)
                    continue
                batch.append((path, image_id, image))
                if len(batch) == bs:
                    self._detect_batch(batch, pool, writes, bar)
                    batch = []
            if batch:
                self._detect_batch(batch, pool, writes, bar)
            self._collect(writes, bar)
        bar.close()

    def _detect_batch(self, batch: list, pool, writes: list, bar) -> None:
        results = self.det.predict([im for _, _, im in batch], [str(p) for p, _, _ in batch])
        self._collect(writes[:-1], bar)  # at most two batches' writes in flight
        del writes[:-1]
        out = [self._out_path(p, p.suffix if p.suffix.lower() in _KEEP_SUFFIXES else ".png") for p, _, _ in batch]
        writes.append((pool.submit(self._write_batch, batch, results, out), len(batch)))

    def _write_batch(self, batch: list, results: list, out: list[Path]) -> list[dict]:
        """Annotated images to ``out``; the batch's COCO results (runs on the I/O thread)."""
        dets: list[dict] = []
        for (path, image_id, _), r, dst in zip(batch, results, out):
            r.save(dst)
            dets += self._coco_results(r, path, image_id)
        return dets

    def _collect(self, writes: list, bar) -> None:
        for future, n in writes:
            self._add(future.result())  # re-raises a failed write here
            self.num_images += n
            bar.update(n)

    def video(self, path: Path) -> None:
        """Annotate every frame of a video into an mp4 (mp4v) in the output folder."""
        import cv2
        import torch
        from tqdm import tqdm
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            self._fail(path, "cannot open video", f"cannot open video {path}")
            return
        fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        bar = tqdm(total=int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None, unit="frame", desc=path.name, file=sys.stderr)
        writer, frames, index, pending = None, [], 0, None
        # one thread draws and writes each batch (in order: a video has one writer) while the next is read
        # and detected
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vild-detect-video") as pool:
            while True:
                ok, frame = cap.read()
                if ok:
                    frames.append(torch.from_numpy(frame[..., ::-1].copy()).permute(2, 0, 1))  # BGR → RGB
                if frames and (not ok or len(frames) == self.det.batch_size):
                    results = self.det.predict(frames, [str(path)] * len(frames))
                    if writer is None:
                        h, w = results[0].image.shape[-2:]
                        out = self._out_path(path, ".mp4")
                        writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                        if not writer.isOpened():
                            cap.release()
                            bar.close()
                            self._fail(path, "cannot write video", f"cannot write {out}: this OpenCV has no mp4v "
                                       f"encoder; pass the frames as images instead")
                            return
                    if pending is not None:
                        self._add(pending.result())
                    pending = pool.submit(self._write_frames, writer, results, path, self.next_id, index)
                    self.next_id, index = self.next_id + len(results), index + len(results)
                    bar.update(len(frames))
                    frames = []
                if not ok:
                    break
            if pending is not None:
                self._add(pending.result())
        cap.release()
        bar.close()
        if writer is None:
            self._fail(path, "no frames", f"video {path} has no readable frames")
            return
        writer.release()
        self.num_frames += index
        self.num_videos += 1

    def _write_frames(self, writer, results: list, path: Path, first_id: int, first_frame: int) -> list[dict]:
        """Annotated frames into the video; their COCO results (runs on the video's writer thread)."""
        dets: list[dict] = []
        for k, r in enumerate(results):
            writer.write(r.draw()[..., ::-1].copy())
            dets += self._coco_results(r, path, first_id + k, first_frame + k)
        return dets

    def _coco_results(self, result, path: Path, image_id: int, frame: Optional[int] = None) -> list[dict]:
        if self.ids is None:
            return []
        image_id = self.ids.image_id(path, image_id)
        if image_id is None:
            return []  # not in the ground truth: annotated, but no ids for the results file
        dets = result.to_coco_json(image_id, self.ids.category_ids)
        for d in dets:
            d["file_name"] = str(path)
            if frame is not None:
                d["frame"] = frame
        return dets

    def _out_path(self, src: Path, suffix: str) -> Path:
        """``out_dir/<stem><suffix>``, numbered when the name is taken (or would overwrite an input)."""
        stem, n = src.stem, 0
        while True:
            cand = self.out_dir / f"{stem}{f'_{n}' if n else ''}{suffix}"
            if cand.resolve() not in self.taken:
                self.taken.add(cand.resolve())
                return cand
            n += 1

    def _fail(self, path: Path, reason: str, message: str, bar=None) -> None:
        self.failures.append((path, reason))
        (bar.write if bar is not None else print)(f"skipped {path}: {message}", file=sys.stderr)

    def summary(self) -> str:
        """The final line: how many images were done, how many skipped and why."""
        done = f"processed {self.num_images + self.num_frames} images"
        if self.num_videos:
            done += f" ({self.num_frames} frames of {self.num_videos} video{'s' if self.num_videos > 1 else ''})"
        reasons = sorted(Counter(r for _, r in self.failures).items(), key=lambda rn: (-rn[1], rn[0]))
        why = f" ({', '.join(f'{n} {r}' for r, n in reasons)})" if reasons else ""
        line = f"{done}, skipped {len(self.failures)}{why}"
        if self.ids is not None and self.ids.unmatched:
            line += (f"; {len(self.ids.unmatched)} not in --coco-gt, so left out of detections.json "
                     f"(is it the right split?)")
        return line
