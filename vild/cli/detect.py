"""``vild-detect``: run a trained ViLD over images, folders, globs, file lists or videos with any vocabulary."""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import itertools
import json
import os
import sys
import tempfile
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Optional, Union

from .options import positive

if TYPE_CHECKING:
    from ..api import Detector
    from ..deploy.runner import OnnxDetector

# Only the standard library at import time, so setup errors are reported before torch loads.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
_KEEP_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
NO_MODEL_HINT = ("train one first: `make demo` trains a small model on the synthetic world, "
                 "tools/train_net.py trains on real data; or pass --weights model.pth")


VOCAB_NOTE = ("A new vocabulary is embedded once, then cached ($VILD_CACHE): every name in each of the checkpoint's "
              "prompt templates (TEACHER.TEMPLATES) through CLIP's text tower, on the GPU or on torch's CPU threads "
              "(every core unless OMP_NUM_THREADS says otherwise), with a progress bar and ETA. The default set, "
              "vild, has 63 templates: LVIS's 1203 names are 75,789 prompts, minutes on a CPU. A model trained "
              "with TEACHER.TEMPLATES simple embeds one prompt per name (\"a photo of a {}.\"), 63x less work, "
              "each name then resting on one phrasing instead of the average of 63. See docs/detect_speed.md.")


class CLIError(Exception):
    """A problem with the command line or its files, reported without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = argparse.ArgumentParser(description=__doc__, epilog=VOCAB_NOTE)
    p.add_argument("--weights", help="checkpoint; default: the newest model_*.pth under $VILD_OUTPUT or ./output")
    p.add_argument("--input", required=True,
                   help="an image, a folder of images, a glob (quote it), a video, or a .txt list of image paths "
                        "(one per line, relative to the current folder; # comments)")
    p.add_argument("--output", required=True, help="folder for annotated images/videos (and detections.json)")
    v = p.add_mutually_exclusive_group()
    v.add_argument("--vocab", help='categories: "kite,unicycle", synonyms with "|": "couch|sofa,tv"')
    v.add_argument("--vocab-file", help="one category per line (synonyms with |, # comments)")
    v.add_argument("--vocab-preset", choices=("coco", "coco_ovd", "lvis"))
    p.add_argument("--score-thresh", type=float, default=None,
                   help="drop detections scoring below this; default: the checkpoint's calibrated threshold, "
                        "else 0.5 (text, vild) or 0.35 (ensemble, whose novel-category scores are smaller). A "
                        "calibrated checkpoint shows confidences: 0.8 = about 8 in 10 such boxes were right on "
                        "held-out images")
    p.add_argument("--max-dets", type=positive, default=100, help="detections kept per image")
    p.add_argument("--per-class-nms", action="store_true",
                   help="NMS per category, so that one box may carry several labels (default: one label per box)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="onnx: --weights is a vild-export model.onnx, run by onnxruntime (see docs/deploy.md)")
    p.add_argument("--batch-size", type=positive, default=4, help="images per forward pass")
    p.add_argument("--json", action="store_true", help="also write detections.json (COCO results format)")
    p.add_argument("--coco-gt", help="with --json: take image and category ids from this COCO annotation file")
    p.add_argument("--part-size", type=positive, default=256,
                   help="images per resumable part (rounded up to whole batches): a re-run after a crash skips the "
                        "parts already written and redoes at most this many images per process; under torchrun "
                        "rank r takes the parts p with p %% WORLD_SIZE == r and rank 0 merges them")
    p.add_argument("--io-threads", type=positive, default=None,
                   help="threads that read images ahead of the model and draw, write and encode behind it "
                        "(default: the usable cores, 3 to 8)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Run detection; 0 = all inputs done, 1 = some inputs failed, 2 = nothing run (setup error)."""
    args = build_parser().parse_args(argv)
    try:
        out_dir = _writable_folder(Path(args.output))
        images, videos = collect_inputs(args.input)
        vocab = _vocabulary(args)
        weights = Path(args.weights) if args.weights else _newest_or_fail()
        from ..api import Detector  # heavy (torch, CLIP): after the cheap checks
        if args.backend == "onnx":
            from ..deploy.runner import OnnxDetector
            det = OnnxDetector(weights, device=args.device, vocabulary=vocab, max_dets=args.max_dets,
                               batch_size=args.batch_size)
        else:
            det = Detector.from_checkpoint(weights, device=args.device, vocabulary=vocab, max_dets=args.max_dets,
                                           batch_size=args.batch_size, per_class_nms=args.per_class_nms)
        det.score_thresh = args.score_thresh if args.score_thresh is not None else det.display_score_thresh
        ids = IdMapper(args.coco_gt, det.names) if args.json else None
    except (CLIError, OSError, ValueError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ..detect_parts import PartStore, world  # imports torch: after the cheap checks, like the Detector
    rank, _ = world()
    if rank == 0:
        print(f"model {weights} ({det.variant}) on {det.device}; {len(det.names)} categories "
              f"({sum(det.base_mask)} base); score threshold {det.score_thresh:g}"
              f"{'' if det.has_masks else '; boxes only (a model trained without masks)'}", file=sys.stderr)
    from ..utils.atomic import atomic_open
    run = DetectionRun(det, out_dir, ids, taken={p.resolve() for p in images + videos},
                       io_threads=args.io_threads)
    part_size = -(-args.part_size // det.batch_size) * det.batch_size
    store = PartStore(out_dir, run_settings(args, det, weights, images, part_size), len(images), part_size)
    run.images(images, store)  # this process's share of the parts (all of them without torchrun)
    if rank != 0:
        return 0  # rank 0 merges and reports this rank's results and failures
    store.wait_for_all()  # the other ranks' parts
    # the parts stream into a hidden file that replaces detections.json when all inputs are done: memory stays
    # flat over a folder of 100k photos, and an interrupted run leaves the previous file as it was
    with atomic_open(out_dir / "detections.json") if ids is not None else contextlib.nullcontext() as results:
        run.merge(store, results)
        for v in videos:
            run.video(v)
        run.finish()
    store.remove()
    print(run.summary())
    return 1 if run.failures else 0


def run_settings(args: argparse.Namespace, det: Union[Detector, OnnxDetector], weights: Path, images: list[Path],
                 part_size: int) -> dict:
    """What a run's results depend on: a re-run resumes only a run with the same."""
    def file_id(path) -> Optional[list]:
        if not path:
            return None
        st = Path(path).stat()
        return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
    # every option but those that only say where things are or how fast they go (a new option counts too)
    options = {k: v for k, v in sorted(vars(args).items()) if k not in ("input", "output", "weights", "io_threads")}
    inputs = hashlib.sha256("\n".join(str(p) for p in images).encode()).hexdigest()
    return {"options": options, "weights": file_id(weights), "vocabulary": det.vocabulary,
            "score_thresh": det.score_thresh, "max_dets": det.max_dets, "part_size": part_size,
            "device": det.device.type, "coco_gt": file_id(getattr(args, "coco_gt", None)), "inputs": inputs}


# ---- inputs ------------------------------------------------------------------------------------
def collect_inputs(spec: str) -> tuple[list[Path], list[Path]]:
    """Images and videos named by a file, a folder (its image files) or a glob, sorted; or by a .txt list, in its
    order."""
    p = Path(spec).expanduser()
    known = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    if p.is_file() and p.suffix.lower() == ".txt":
        files = read_file_list(p)
    elif p.is_dir():
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


def read_file_list(path: Path) -> list[Path]:
    """The paths listed in a text file, one per line (blank lines and # comments skipped), in their order.

    Unreadable or missing entries are kept: the run reports them as skipped, like a broken file in a folder.
    """
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read the file list {path}: {e}") from None
    files = [Path(line.strip()).expanduser() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not files:
        raise CLIError(f"the file list {path} names no files: write one image path per line")
    return files


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
    from ..teacher.vocabulary import dedupe_case_insensitive, load_vocabulary_file, parse_vocabulary
    if args.vocab is not None:
        return dedupe_case_insensitive(parse_vocabulary(args.vocab))
    if args.vocab_file:
        return dedupe_case_insensitive(load_vocabulary_file(args.vocab_file))
    if args.vocab_preset:
        from ..vocab_presets import get_preset
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
class IdMapper:
    """Image and category ids: from a COCO ground-truth file, else input order and vocabulary order (from 1)."""

    def __init__(self, gt_path: Optional[str], names: list[str]):
        self.by_file: Optional[dict[str, int]] = None
        self.unmatched: set[Path] = set()  # inputs whose file name the ground truth does not list
        self.category_ids = list(range(1, len(names) + 1))
        if not gt_path:
            return
        from ..teacher.vocabulary import name_key
        gt = json.loads(Path(gt_path).read_text())
        # LVIS images name their file only in coco_url
        self.by_file = {Path(im.get("file_name") or im.get("coco_url", "")).name: im["id"] for im in gt["images"]}
        cats = {name_key(c["name"]): c["id"] for c in gt["categories"]}
        missing = [n for n in names if name_key(n) not in cats]
        if missing:
            raise CLIError(f"categories not in {gt_path}: {missing[:10]}; use the ground truth's names")
        self.category_ids = [cats[name_key(n)] for n in names]

    def image_id(self, path: Path, fallback: int) -> Optional[int]:
        """The ground truth's id for this file (None if absent), or ``fallback`` without ground truth."""
        if self.by_file is None:
            return fallback
        found = self.by_file.get(path.name)
        if found is None:
            self.unmatched.add(path)  # a video's frames count once
        return found


# ---- running -----------------------------------------------------------------------------------
def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _read(path: Path):
    """The image, or the ImageReadError that says why it cannot be read (runs on an I/O thread)."""
    from ..io import ImageReadError, read_image
    try:
        return read_image(path)
    except ImageReadError as e:
        return e


class _PartTally:
    """A part's results while its batches are written."""

    def __init__(self, batches: int):
        self.batches_left, self.images = batches, 0
        self.failures: list[list[str]] = []  # [path, reason]
        self.unmatched: list[str] = []  # files --coco-gt does not list
        self.lines: list[str] = []  # the detections' JSON


class DetectionRun:
    """Feeds batches to the detector, writes outputs, and keeps the tallies for the summary."""

    def __init__(self, det: Union[Detector, OnnxDetector], out_dir: Path, ids: Optional[IdMapper], taken: set,
                 io_threads: Optional[int] = None):
        """``io_threads``: threads reading ahead of the model and writing behind it (default from the cores)."""
        self.det, self.out_dir, self.ids, self.taken = det, out_dir, ids, set(taken)
        self.failures: list[tuple[Path, str]] = []
        self.num_detections = 0
        self.num_images = self.num_frames = self.num_videos = 0
        self.next_id = 1
        self.io_threads = io_threads or min(8, max(3, _usable_cores()))
        self._results: Optional[IO] = None

    def _add_json(self, line: str) -> None:
        if self._results is not None:
            self._results.write(("," if self.num_detections else "") + line)
        self.num_detections += 1

    def _add(self, dets: list[dict]) -> None:
        for d in dets:
            self._add_json(json.dumps(d))

    def finish(self) -> None:
        """Close the results' JSON list."""
        if self._results is not None:
            self._results.write("]")

    # ---- images: this process's parts, then (rank 0) the merge ---------------------------------------------------
    def images(self, paths: list[Path], store) -> None:
        """Detect in every readable image of this process's parts of ``store`` and write each finished part.

        Batches are runs of ``batch_size`` input positions inside a part (an unreadable file leaves its batch one
        image short), so every process count forms the same batches. I/O threads keep the model busy: they read
        the next batches while the model runs, and draw, write and RLE-encode the previous ones (decoding,
        drawing and encoding release the GIL).
        """
        from tqdm import tqdm

        from ..detect_parts import world
        rank, world_size = world()
        self.next_id = len(paths) + 1  # an image's id is its position + 1 (unreadable files use up an id too)
        out = [self._out_path(p, p.suffix if p.suffix.lower() in _KEEP_SUFFIXES else ".png") for p in paths]
        if rank == 0:
            store.remove_others()
            done = len(store.done())
            if done:
                print(f"resuming: {done} of {store.num_parts} parts were done by an earlier run", file=sys.stderr)
        parts = store.todo(rank, world_size)
        bs = self.det.batch_size
        batches = [(part, positions[k:k + bs]) for part in parts
                   for positions in [list(store.positions(part))] for k in range(0, len(positions), bs)]
        bar = tqdm(total=sum(len(b) for _, b in batches), unit="img", desc="detect", file=sys.stderr,
                   **({"disable": True} if rank else {}))  # one bar, rank 0's
        tally = {part: _PartTally(sum(1 for b in batches if b[0] == part)) for part in parts}
        with ThreadPoolExecutor(max_workers=self.io_threads, thread_name_prefix="vild-detect-io") as pool:
            todo, reads, writes, saved = iter(batches), deque(), deque(), []
            for part, positions in itertools.islice(todo, 2):  # reads run up to two batches ahead
                reads.append((part, positions, [pool.submit(_read, paths[i]) for i in positions]))
            while reads:
                part, positions, futures = reads.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    reads.append((nxt[0], nxt[1], [pool.submit(_read, paths[i]) for i in nxt[1]]))
                ok = []
                for i, future in zip(positions, futures):
                    image = future.result()
                    if isinstance(image, Exception):
                        tally[part].failures.append([str(paths[i]), image.reason])
                        bar.write(f"skipped {paths[i]}: {image}", file=sys.stderr)
                        bar.update(1)
                    else:
                        ok.append((i, image))
                results = self.det.predict([im for _, im in ok], [str(paths[i]) for i, _ in ok]) if ok else []
                if len(writes) == 2:  # at most two batches' results held: masks are [n, H, W] bytes each
                    self._collect(writes.popleft(), tally, store, pool, saved, bar)
                # one task per image: a batch's images are drawn and encoded on as many threads
                jobs = [pool.submit(self._write_one, paths[i], i + 1, out[i], r) for (i, _), r in zip(ok, results)]
                writes.append((part, jobs))
            while writes:
                self._collect(writes.popleft(), tally, store, pool, saved, bar)
            for future in saved:
                future.result()  # re-raises a failed part write here
        bar.close()

    def _write_one(self, path: Path, image_id: int, dst: Path, result) -> tuple[list[str], Optional[str]]:
        """The annotated image; its COCO results as JSON lines, and its path if --coco-gt lacks it (an I/O
        thread's)."""
        result.save(dst)
        lines = [json.dumps(d) for d in self._coco_results(result, path, image_id)]
        return lines, str(path) if self.ids is not None and path in self.ids.unmatched else None

    def _collect(self, write: tuple, tally: dict, store, pool, saved: list, bar) -> None:
        part, jobs = write
        t = tally[part]
        for job in jobs:
            lines, unmatched = job.result()  # re-raises a failed write here
            t.lines += lines
            t.images += 1
            if unmatched:
                t.unmatched.append(unmatched)
        t.batches_left -= 1
        bar.update(len(jobs))
        if t.batches_left == 0:  # the part is complete: store it (and free its lines)
            summary = {"images": t.images, "failures": t.failures, "unmatched": t.unmatched}
            saved.append(pool.submit(store.write, part, summary, t.lines))
            del tally[part]

    def merge(self, store, results: Optional[IO]) -> None:
        """Stream every part's detections into ``results`` in input order and take their tallies (rank 0)."""
        self._results = results
        if results is not None:
            results.write("[")
        for summary, lines in store.read():
            self.num_images += summary["images"]
            self.failures += [(Path(f), reason) for f, reason in summary["failures"]]
            if self.ids is not None:
                self.ids.unmatched.update(Path(f) for f in summary["unmatched"])
            for line in lines:
                self._add_json(line)

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


if __name__ == "__main__":  # torchrun -m vild.cli.detect ...
    sys.exit(main())
