"""The synthetic-world demo: ViLD's ablation (text vs. image distillation vs. ensemble vs. oracle) in minutes on a CPU.

Every stage goes through the same code a real LVIS run uses: the world is exported as LVIS/COCO
JSON and read by ``vild.data``; the tiny teacher is an open_clip model loaded by path through
``vild.teacher``; the proposal store is written by ``vild.engine.precompute`` from the RPN of the
ViLD-text model (trained on base categories only); each detector is trained and evaluated by
``vild.engine.Trainer`` with the official ``lvis`` and ``pycocotools`` evaluators.

The teacher and the detectors' backbone start from shipped weights, the demo's stand-ins for the CLIP and
ImageNet weights a real run downloads: ``DemoSettings.full()`` (``vild-demo --full``) makes both anew and trains
the detectors from random init, which is how the shipped files were made.
Each stage's output is cached under the output folder; ``recompute=True`` starts afresh.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import platform
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import CONFIGS_DIR, CfgNode, load_config
from ..engine.logger import setup_logger

logger = logging.getLogger("vild")

FOLDERS = {"ViLD-text": "vild_text", "ViLD": "vild", "ViLD-ensemble": "vild_ensemble",
           "oracle (all categories)": "oracle", "F-VLM": "fvlm"}  # variant -> its folder under the output folder
SHIPPED_TEACHER = Path(__file__).parent / "pretrained" / "vild-tiny-clip.pt"
SHIPPED_TEACHER_KEY = {"seed": 0, "steps": 1000, "batch": 128, "weights": "fp16"}
# the demo's stand-in for ImageNet weights: the TinyCNN body of the full demo's ViLD-text (base boxes only)
SHIPPED_BACKBONE = Path(__file__).parent / "pretrained" / "tiny-backbone.pt"

VARIANTS = {  # name → (MODEL.VILD.VARIANT, training split, uses the proposal store)
    "ViLD-text": ("text", "lvis", False),
    "ViLD": ("vild", "lvis", True),
    "ViLD-ensemble": ("ensemble", "lvis", True),
    "oracle (all categories)": ("text", "all", False),
}
# the frozen-CLIP variant, one more row with ``DemoSettings.fvlm`` (configs/synthetic/fvlm_demo.yaml): it trains
# beside ViLD-text and the oracle, needs no proposal store, and its backbone is the teacher's own trunk
FVLM_ROW = {"F-VLM": ("fvlm", "lvis", False)}


@dataclass
class DemoSettings:
    """Sizes of one demo run; ``fast()`` is the smoke-test size."""

    seed: int = 0
    num_train: int = 600
    num_val: int = 150
    image_size: int = 128
    teacher_steps: int = 1000
    teacher_batch: int = 128
    detector_iters: int = 400  # from the shipped backbone; 1000 from random init (full())
    detector_batch: int = 6  # images per training step
    max_proposals: int = 50
    workers: int = 2  # detectors trained side by side, one thread each
    train_teacher: bool = False  # pretrain the teacher here instead of using the shipped one
    pretrained_backbone: bool = True  # detectors start from SHIPPED_BACKBONE instead of random init
    fvlm: bool = False  # also train and tabulate F-VLM (FVLM_ROW)

    def variants(self) -> dict[str, tuple[str, str, bool]]:
        """The rows this run trains: name → (MODEL.VILD.VARIANT, training split, uses the proposal store)."""
        return {**VARIANTS, **(FVLM_ROW if self.fvlm else {})}

    @classmethod
    def full(cls) -> "DemoSettings":
        """Every stage from nothing (``vild-demo --full``): the teacher pretrained here, the detectors from random
        init on the longer schedule. This is how the shipped teacher and backbone were made."""
        return cls(train_teacher=True, pretrained_backbone=False, detector_iters=1000)

    @classmethod
    def fast(cls) -> "DemoSettings":
        """A few images and steps: every stage runs and writes its outputs."""
        return cls(num_train=16, num_val=6, teacher_steps=4, teacher_batch=32, detector_iters=4, max_proposals=10,
                   workers=1, train_teacher=True)


def _check_settings(out: Path, s: DemoSettings) -> None:
    """Cached stages are reused only by a run of the same settings: refuse a folder that holds another's."""
    # an added row (fvlm) leaves every other stage valid: it is not part of the key
    marker, settings = out / "demo_settings.json", {k: v for k, v in asdict(s).items() if k != "fvlm"}
    known = json.loads(marker.read_text()) if marker.is_file() else None
    trained = any((out / folder / "model_final.pth").is_file() for folder in FOLDERS.values())
    if (known is not None and known != settings) or (known is None and trained):
        raise ValueError(f"{out} holds a demo run with other or unknown settings: pass --recompute to start it "
                         f"afresh, or another --out")
    marker.write_text(json.dumps(settings, indent=1))


def _timed(stages: dict, name: str):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            stages[name] = round(time.perf_counter() - self.t, 1)
    return _T()


def make_world(out: Path, s: DemoSettings) -> dict:
    """Generate the world once per (seed, sizes); reuse it after."""
    from .world import generate_world
    marker = out / "world" / "demo_world.json"
    key = {"seed": s.seed, "num_train": s.num_train, "num_val": s.num_val, "image_size": s.image_size}
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return json.loads(marker.read_text())["world"]
    logger.info("generating the synthetic world (%d train / %d val images)", s.num_train, s.num_val)
    world = generate_world(str(out / "world"), seed=s.seed, num_train=s.num_train, num_val=s.num_val,
                           image_size=s.image_size)
    marker.write_text(json.dumps({"key": key, "world": world}))
    return world


def make_teacher(out: Path, s: DemoSettings, world: dict) -> tuple[Path, dict]:
    """The tiny CLIP teacher: the shipped one, or pretrained here on captioned crops (all categories); reports its
    zero-shot accuracy on the world's validation boxes.

    The teacher is to the demo what downloaded CLIP weights are to a real run, so by default the demo starts from
    ``SHIPPED_TEACHER`` (what ``train_teacher`` makes with ``SHIPPED_TEACHER_KEY``'s settings).
    """
    from ..teacher.clip_teacher import sha256_file
    from .clip_pretrain import pretrain_teacher, region_zero_shot_accuracy
    path, metrics_file = out / "teacher" / "vild-tiny-clip.pt", out / "teacher" / "metrics.json"
    shipped = not s.train_teacher
    key = ({"shipped": sha256_file(SHIPPED_TEACHER), "world_seed": s.seed} if shipped else
           {"seed": s.seed, "steps": s.teacher_steps, "batch": s.teacher_batch, "weights": "fp16"})
    if path.is_file() and metrics_file.is_file() and json.loads(metrics_file.read_text()).get("key") == key:
        return path, json.loads(metrics_file.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    if shipped:
        logger.info("teacher: the shipped %s (vild-demo --train-teacher pretrains one here)", SHIPPED_TEACHER.name)
        shutil.copyfile(SHIPPED_TEACHER, path)
        train_metrics = {"shipped": SHIPPED_TEACHER_KEY}
    else:
        logger.info("pretraining the tiny CLIP teacher (%d steps of %d captioned crops)", s.teacher_steps,
                    s.teacher_batch)
        # 16 captioned crops per step: a longer schedule sees new pairs, not the same ones more often
        train_metrics = pretrain_teacher(str(path), seed=s.seed, steps=s.teacher_steps, batch_size=s.teacher_batch,
                                         num_pairs=16 * s.teacher_steps)
    zs = region_zero_shot_accuracy(str(path), world, split="val", cache_dir=str(out / "cache"))
    metrics = {"key": key, "train": train_metrics, "zero_shot_val_boxes": zs}
    metrics_file.write_text(json.dumps(metrics, indent=1))
    return path, metrics


def demo_config(out: Path, s: DemoSettings, world: dict, teacher: Path, variant: str, split: str,
                store: Path | None, opts: list[str] | None = None) -> CfgNode:
    """The config of one demo detector, on configs/synthetic/demo_base.yaml (F-VLM: on fvlm_demo.yaml, whose own
    ``_BASE_`` it is; ``opts``: KEY VALUE overrides of that file)."""
    custom = {
        "synth_train": {"JSON": world["lvis_train"], "IMAGES": world["images_train"], "TYPE": "lvis", "SPLIT": split},
        # the same validation images scored twice: LVIS metrics (APr/APc/APf) and COCO AP50 on novel/base
        "synth_val_lvis": {"JSON": world["lvis_val"], "IMAGES": world["images_val"], "TYPE": "lvis", "SPLIT": "lvis"},
        "synth_val_coco": {"JSON": world["lvis_val"], "IMAGES": world["images_val"], "TYPE": "coco", "SPLIT": "lvis"},
    }
    fvlm = variant == "fvlm"
    cfg = load_config(CONFIGS_DIR / "synthetic" / ("fvlm_demo.yaml" if fvlm else "demo_base.yaml"), opts or [])
    cfg.DATASETS.CUSTOM.merge(custom, allow_new=True)
    cfg.DATASETS.TRAIN = ["synth_train"]
    cfg.DATASETS.TEST = ["synth_val_lvis", "synth_val_coco"]
    cfg.DATASETS.PROPOSAL_STORE = str(store) if store else ""
    cfg.MODEL.VILD.VARIANT = variant
    cfg.MODEL.VILD.NUM_DISTILL_PROPOSALS = s.max_proposals
    # F-VLM's backbone is the teacher's frozen trunk: the shipped CNN body does not fit it
    cfg.MODEL.BACKBONE.PRETRAINED = str(SHIPPED_BACKBONE) if s.pretrained_backbone and not fvlm else ""
    cfg.TEACHER.PRETRAINED = str(teacher)
    cfg.TEACHER.CACHE_DIR = str(out / "cache")
    cfg.SOLVER.MAX_ITER = s.detector_iters
    cfg.SOLVER.IMS_PER_BATCH = s.detector_batch
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, max(s.detector_iters // 10, 1))
    cfg.SEED = s.seed
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def train_detector(cfg: CfgNode, out_dir: Path, threads: int | None = None) -> dict:
    """Train (or reuse) one detector, evaluate and calibrate it; returns the evaluation metrics, calibration and
    ``train_seconds`` (from building the trainer to its last step, evaluation apart)."""
    from ..engine.calibration import calibrate_from_config
    from ..engine.checkpoint import load_checkpoint
    from ..engine.trainer import Trainer
    metrics_file, weights = out_dir / "demo_metrics.json", out_dir / "model_final.pth"
    cfg.OUTPUT_DIR = str(out_dir)
    if threads:
        torch.set_num_threads(threads)
    if metrics_file.is_file() and weights.is_file():
        results = json.loads(metrics_file.read_text())
    else:
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        results = trainer.train()
        results["train_seconds"] = round(trainer.train_ended_at - t0, 1)
        metrics_file.write_text(json.dumps(results, indent=1))
    # region mean on training images, display threshold on validation: each detector on its own datasets
    entry = load_checkpoint(weights).get("calibration") or calibrate_from_config(cfg, str(weights))
    logger.info("%s: display threshold %.3f (F1 %.2f on validation, all names)", out_dir.name,
                entry["score_thresh"], entry["f1"])
    return {**results, "calibration": {"score_thresh": entry["score_thresh"], "f1": entry["f1"]}}


def train_detectors(jobs: dict[str, tuple[CfgNode, Path]], workers: int) -> dict[str, dict]:
    """Train independent detectors; with ``workers`` > 1, side by side in single-thread processes.

    The tiny models' ops are too small to use two threads well: two single-thread trainings at
    once finish much sooner than two two-thread trainings one after the other.
    """
    if workers <= 1 or len(jobs) == 1:
        return {name: train_detector(cfg, folder) for name, (cfg, folder) in jobs.items()}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        futures = {name: pool.submit(train_detector, cfg, folder, 1) for name, (cfg, folder) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def make_store(out: Path, cfg: CfgNode, rpn_weights: Path, s: DemoSettings) -> tuple[Path, float | None]:
    """CLIP embeddings of the ViLD-text RPN's proposals on every training image (resumes if interrupted), and the
    seconds writing it took (kept beside it for cached runs; None when an interrupted run resumed it)."""
    from ..engine.distributed import resolve_device
    from ..engine.precompute import load_proposal_model, precompute_clip_proposals
    from ..teacher import CLIPTeacher
    store, timing = out / "clip_proposals", out / "clip_proposals_seconds.json"
    t0 = time.perf_counter()
    teacher = CLIPTeacher.from_config(cfg, resolve_device("cpu"))
    model = load_proposal_model(str(rpn_weights), torch.device("cpu"))
    stats = precompute_clip_proposals(cfg, teacher, store, model=model, max_proposals=s.max_proposals,
                                      shard_index=0, num_shards=1, batch_size=16, num_workers=0)
    logger.info("proposal store: %d images written now (%d were pending)", stats["written"], stats["pending_before"])
    if stats["written"] and stats["written"] == stats["pending_before"]:  # written whole by this call
        timing.write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1)}))
    elif stats["written"]:
        timing.unlink(missing_ok=True)
    return store, json.loads(timing.read_text())["seconds"] if timing.is_file() else None


def proposal_recall(store_dir: Path, world: dict, iou: float = 0.5) -> dict:
    """Share of base and novel training objects that some stored proposal covers at IoU ≥ ``iou``."""
    from torchvision.ops import box_iou

    from ..data import ProposalStore
    store = ProposalStore(store_dir)
    data = json.loads(Path(world["lvis_train"]).read_text())
    novel_ids = {c["id"] for c in data["categories"] if c["frequency"] == "r"}
    hit, total = {"base": 0, "novel": 0}, {"base": 0, "novel": 0}
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for image_id, anns in by_image.items():
        entry = store.get(image_id)
        props = torch.as_tensor(entry[0]) if entry is not None else torch.zeros(0, 4)
        for a in anns:
            x, y, w, h = a["bbox"]
            kind = "novel" if a["category_id"] in novel_ids else "base"
            total[kind] += 1
            if len(props) and box_iou(torch.tensor([[x, y, x + w, y + h]]), props).max() >= iou:
                hit[kind] += 1
    return {k: hit[k] / max(total[k], 1) for k in hit}


def summarize(results: dict) -> dict:
    """One row per variant: the numbers the ablation is about."""
    lvis, coco = results["synth_val_lvis"], results["synth_val_coco"]
    return {
        "APr_mask": lvis["segm"]["APr"], "AP_mask": lvis["segm"]["AP"],
        "AP_base_mask": coco["segm"]["AP_base"], "AP_novel_mask": coco["segm"]["AP_novel"],
        "AP50_novel_box": coco["bbox"]["AP50_novel"], "AP50_base_box": coco["bbox"]["AP50_base"],
        "AP50_all_box": coco["bbox"]["AP50_all"],
    }


def format_table(rows: dict, teacher_zs: dict) -> str:
    """A markdown table of the ablation."""
    cols = [("APr_mask", "APr (novel, mask)"), ("AP_base_mask", "AP base (mask)"), ("AP_mask", "AP all (mask)"),
            ("AP50_novel_box", "AP50 novel (box)"), ("AP50_base_box", "AP50 base (box)"),
            ("train_seconds", "training s")]
    lines = ["| model | " + " | ".join(c for _, c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r[k]) for k, _ in cols) + " |")
    lines.append("")
    lines.append("Training s: from building the trainer to its last step, two trainings at a time on one thread each; "
                 "ViLD's and ViLD-ensemble's include the proposal store's.")
    lines.append(f"Teacher zero-shot accuracy on val boxes: base {100 * teacher_zs['base']:.1f} %, "
                 f"novel {100 * teacher_zs['novel']:.1f} %, all {100 * teacher_zs['all']:.1f} % "
                 f"({teacher_zs['n']} boxes).")
    return "\n".join(lines)


def _plus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a + b, 1)


def _fmt(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.1f}"


def ablation_checks(rows: dict, teacher_zs: dict) -> dict:
    """The paper's claims, as booleans with the numbers they rest on."""
    text, vild, ens = rows["ViLD-text"], rows["ViLD"], rows["ViLD-ensemble"]
    t, v = text["AP50_novel_box"], vild["AP50_novel_box"]
    return {
        "vild_novel_ap50_at_least_2x_text": bool(v >= 2 * t and v > 0),
        "vild_novel_ap50_at_least_15_points_above_text": bool(v - t >= 15),
        "ensemble_base_ap_within_5_points_of_text": bool(abs(ens["AP_base_mask"] - text["AP_base_mask"]) <= 5),
        "teacher_novel_zero_shot_at_least_80": bool(teacher_zs["novel"] >= 0.8),
        **(fvlm_checks(rows["F-VLM"], vild) if "F-VLM" in rows else {}),
    }


def fvlm_checks(fvlm: dict, vild: dict) -> dict:
    """F-VLM's goal against ViLD: more novel AP50, in half the training time or less (store included)."""
    t_f, t_v = fvlm.get("train_seconds"), vild.get("train_seconds")
    return {"fvlm_novel_ap50_above_vild": bool(fvlm["AP50_novel_box"] > vild["AP50_novel_box"]),
            "fvlm_training_at_most_half_of_vild": bool(t_f is not None and t_v is not None and t_f <= 0.5 * t_v)}


def export_backbone(weights: str | Path, dest: str | Path) -> Path:
    """Write the TinyCNN body of a trained demo detector as a backbone weights file (``MODEL.BACKBONE.PRETRAINED``).

    ``SHIPPED_BACKBONE`` is the body of ``vild-demo --full``'s ViLD-text: ``export_backbone(
    "output/demo_full/vild_text/model_final.pth", SHIPPED_BACKBONE)``.
    """
    from ..engine.checkpoint import load_checkpoint
    from ..utils.atomic import atomic_save
    prefix = "backbone.body."
    state = {k[len(prefix):]: v.float() if v.is_floating_point() else v
             for k, v in load_checkpoint(weights)["model"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{weights} holds no backbone.body.* weights: pass a trained demo detector's checkpoint")
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state, str(dest))
    return Path(dest)


def export_demo_model(out: str | Path, dest: str | Path, variant_folder: str = "vild") -> Path:
    """Copy a trained demo detector (weights-only, fp16) and its teacher into ``dest``, loadable from there alone.

    The ViLD goes to ``dest/model.pth``, another variant to ``dest/model_<variant>.pth`` (``model_ensemble.pth``).
    This is how tests/assets/demo_model was made (see ``vild-demo --help``, ``--export``).
    """
    from ..engine.checkpoint import export_checkpoint
    out, dest = Path(out), Path(dest)
    teacher = out / "teacher" / "vild-tiny-clip.pt"
    model = out / variant_folder / "model_final.pth"
    for f in (teacher, model):
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist: run the demo first (python tools/demo.py --out {out})")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(teacher, dest / teacher.name)
    name = "model.pth" if variant_folder == "vild" else f"model_{variant_folder.removeprefix('vild_')}.pth"
    # the teacher is named by file name only: Detector.from_checkpoint finds it beside the checkpoint
    return export_checkpoint(model, dest / name, half=True, teacher_weights=teacher.name)


def run_demo(out: str | Path = "output/demo", settings: DemoSettings | None = None, recompute: bool = False,
             results_dir: str | Path | None = "benchmarks/results", picture: str | Path | None = None,
             threads: int | None = None) -> dict:
    """Run every stage (cached), print the table, write it under ``results_dir``; return the summary."""
    s = settings or DemoSettings()
    out = Path(out)
    if recompute and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, s)
    setup_logger(out)
    if threads:
        torch.set_num_threads(threads)
    t0, stages = time.perf_counter(), {}
    with _timed(stages, "world"):
        world = make_world(out, s)
    with _timed(stages, "teacher"):
        teacher, tmetrics = make_teacher(out, s, world)
    zs = tmetrics["zero_shot_val_boxes"]
    logger.info("teacher zero-shot on val boxes: base %.1f %%, novel %.1f %%", 100 * zs["base"], 100 * zs["novel"])

    variants = s.variants()

    def job(name: str, store: Path | None) -> tuple[CfgNode, Path]:
        variant, split, distills = variants[name]
        return demo_config(out, s, world, teacher, variant, split, store if distills else None), out / FOLDERS[name]

    raw = {}
    first = [n for n in ("ViLD-text", "oracle (all categories)", "F-VLM") if n in variants]
    with _timed(stages, "train+eval+calibrate " + ", ".join(first)):
        raw.update(train_detectors({n: job(n, None) for n in first}, s.workers))
    with _timed(stages, "proposal store"):
        cfg, _ = job("ViLD", None)
        store, store_seconds = make_store(out, cfg, out / FOLDERS["ViLD-text"] / "model_final.pth", s)
        recall = proposal_recall(store, world)
    logger.info("stored proposals cover %.1f %% of base and %.1f %% of novel training objects (IoU 0.5)",
                100 * recall["base"], 100 * recall["novel"])
    with _timed(stages, "train+eval+calibrate ViLD and ViLD-ensemble"):
        raw.update(train_detectors({n: job(n, store) for n in ("ViLD", "ViLD-ensemble")}, s.workers))
    calibration = {FOLDERS[name]: raw[name].pop("calibration") for name in variants}
    # a model's training cost; ViLD's and ViLD-ensemble's include the proposal store they distill from
    train_seconds = {name: _plus(raw[name].pop("train_seconds", None), store_seconds if variants[name][2] else 0.0)
                     for name in variants}
    rows = {name: {**summarize(raw[name]), "train_seconds": train_seconds[name]} for name in variants}
    total = round(time.perf_counter() - t0, 1)
    table = format_table(rows, zs)
    checks = ablation_checks(rows, zs)
    print("\n" + table + "\n")
    for k, ok in checks.items():
        print(f"  [{'x' if ok else ' '}] {k}")
    summary = {
        "what": "synthetic-world ablation (NOT LVIS numbers): shapes world, tiny CLIP teacher, tiny ViLD",
        "settings": asdict(s), "rows": rows, "teacher_zero_shot": zs, "checks": checks,
        "proposal_recall_iou50": recall, "calibration": calibration,
        "seconds": {"total": total, **stages},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    if picture:
        from .demo_picture import save_novel_picture
        save_novel_picture(out / "vild" / "model_final.pth", world, picture)
        summary["picture"] = str(picture)
    if results_dir:
        rd = Path(results_dir)
        rd.mkdir(parents=True, exist_ok=True)
        stem = "demo_synthetic_fvlm" if s.fvlm else "demo_synthetic"
        (rd / f"{stem}.json").write_text(json.dumps(summary, indent=1))
        (rd / f"{stem}.md").write_text(
            f"# Synthetic-world ablation (not LVIS numbers)\n\n{table}\n\nTotal time {total} s "
            f"({summary['machine']['threads']} threads, {summary['machine']['processor']}).\n")
    logger.info("demo finished in %.0f s", total)
    return summary
