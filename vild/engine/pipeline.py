"""ViLD and ViLD-ensemble from nothing in one command: proposal model → CLIP proposal store → distillation → evaluation.

Each stage records what it was made from (its config, the teacher's identity, the dataset, the stage before it) in
``OUTPUT_DIR/pipeline.json``. A finished stage whose record matches is reused; an unfinished one continues where it
stopped (its newest checkpoint, the store's committed records), so a run killed at any point is started again with
the same command; a stage made from something else stops the run with an error naming what differs.

``OUTPUT_DIR`` holds::

    pipeline.json      the stages' records
    proposal_model/    ViLD-text trained on the base categories, whose RPN proposes (unless PIPELINE.PROPOSAL_MODEL)
    clip_proposals/    the CLIP proposal store (unless DATASETS.PROPOSAL_STORE names one)
    model_final.pth    ViLD (or ViLD-ensemble) trained with distillation; metrics.jsonl, log.txt, inference/NAME/
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import CfgNode
from ..utils import comm
from ..utils.atomic import atomic_write_json
from .checkpoint import checkpoints_newest_first, load_checkpoint
from .logger import MetricsWriter, drop_replayed_lines, setup_logger

STAGES = ("proposal_model", "store", "distill", "evaluate")
FORMAT_VERSION = 1
# settings that change where outputs go or how a run is watched, not what a stage makes; the datasets enter a
# record by content (dataset_identity), the teacher by its identity
_NOT_RECORDED = ("OUTPUT_DIR", "TEST", "PIPELINE", "DATALOADER", "MODEL.DEVICE", "TEACHER.CACHE_DIR", "TEACHER.BATCH_SIZE",
                 "TEACHER.PRETRAINED", "SOLVER.LOG_PERIOD", "SOLVER.CHECKPOINT_PERIOD", "SOLVER.KEEP_CHECKPOINTS",
                 "DATASETS")


class StageMismatch(ValueError):
    """A stage's output was made from other inputs than this run's (config, teacher, dataset, earlier stage)."""


def uses_pipeline(cfg: CfgNode) -> bool:
    """Whether ``tools/train_net.py`` trains this config through the pipeline (the variants that distill)."""
    return cfg.MODEL.VILD.VARIANT in ("vild", "ensemble")


def dataset_identity(cfg: CfgNode, name: str) -> dict:
    """What a dataset is, for a stage record: its json's content hash and how it is split."""
    from ..data.catalog import get_dataset_meta
    from ..data.loader import _novel_names
    from ..teacher.clip_teacher import sha256_file
    meta = get_dataset_meta(name, cfg)
    return {"name": name, "json_sha256": sha256_file(meta.json_file), "type": meta.evaluator_type, "split": meta.split,
            "novel": sorted(n.lower() for n in _novel_names(cfg, meta.split))}


def recorded_config(cfg: CfgNode) -> dict:
    """The config as a stage record keeps it: without the settings listed in ``_NOT_RECORDED``."""
    d = json.loads(json.dumps(cfg.to_dict()))
    for key in _NOT_RECORDED:
        *parents, last = key.split(".")
        node = d
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    return d


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two records, as ``key: old -> new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {_short(old)} -> {_short(new)}"]


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


class Pipeline:
    """Runs the stages of one OUTPUT_DIR (every rank of a torchrun job runs it; rank 0 keeps the records)."""

    def __init__(self, cfg: CfgNode, resume: bool = False):
        """``resume``: continue checkpoints of a distillation run that has no record (one started without the pipeline)."""
        from ..teacher import CLIPTeacher
        from .distributed import init_distributed, resolve_device
        self.cfg, self.resume = cfg, resume
        self.out = Path(cfg.OUTPUT_DIR)
        self.device = resolve_device(cfg.MODEL.DEVICE)
        init_distributed(self.device)
        self.rank = comm.get_rank()
        if comm.is_main_process():
            self.out.mkdir(parents=True, exist_ok=True)
        self.log("pipeline")
        self.teacher = CLIPTeacher.from_config(cfg, self.device)
        self.records_file = self.out / "pipeline.json"
        self.records = json.loads(self.records_file.read_text()) if self.records_file.is_file() else \
            {"format_version": FORMAT_VERSION, "stages": {}}
        self.train_data = dataset_identity(cfg, cfg.DATASETS.TRAIN[0])

    def log(self, stage: str):
        """The logger, its lines naming ``stage``, writing to OUTPUT_DIR/log.txt."""
        return setup_logger(self.out, self.rank, stage=stage)

    # ---- records -----------------------------------------------------------------------------
    def state(self, name: str, inputs: dict, output_present: bool, fix: str) -> str:
        """``done``, ``resume`` or ``new`` for a stage about to run on ``inputs``; a mismatch raises StageMismatch."""
        rec = self.records["stages"].get(name)
        if rec is None or not output_present:
            return "new"
        if rec["inputs"] != inputs:
            diff = differences(rec["inputs"], inputs)
            raise StageMismatch(f"stage {name} in {self.out} was made from other inputs than this run's "
                                f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}): {fix}")
        return "done" if rec.get("done") else "resume"

    def _write(self, name: str, record: dict) -> None:
        self.records["stages"][name] = record
        if comm.is_main_process():
            atomic_write_json(self.records_file, self.records, indent=1)
        comm.synchronize()

    def begin(self, name: str, inputs: dict) -> None:
        """Record that stage ``name`` works on ``inputs`` (before its first output)."""
        self._write(name, {"inputs": inputs, "done": False})

    def finish(self, name: str, **extra: Any) -> None:
        """Record stage ``name`` as finished, with ``extra`` facts about its output."""
        self._write(name, {**self.records["stages"][name], "done": True, **extra})

    # ---- stages ------------------------------------------------------------------------------
    def run(self) -> dict:
        """Every stage, each reused or continued where possible; returns the evaluation metrics by dataset."""
        store_dir, store_inputs = self.store()
        trainer = self.distill(store_dir, store_inputs)
        return self.evaluate(trainer)

    def proposal_source(self) -> dict:
        """Where the store's boxes come from: PIPELINE.PROPOSAL_MODEL, or ViLD-text trained here (stage 1)."""
        from ..teacher.clip_teacher import sha256_file
        given = self.cfg.PIPELINE.PROPOSAL_MODEL
        if given:
            if not Path(given).is_file():
                raise FileNotFoundError(f"PIPELINE.PROPOSAL_MODEL {given} does not exist: give a checkpoint whose RPN "
                                        f"proposes, a COCO-results json of boxes, or '' to train ViLD-text first")
            kind = "json" if given.endswith(".json") else "checkpoint"
            self.log("proposal_model").info("stage 1/4 proposal_model: given, %s %s", kind, given)
            return {kind: given, "sha256": sha256_file(given)}
        from .trainer import Trainer
        folder = self.out / "proposal_model"
        cfg = self.cfg.clone()
        cfg.MODEL.VILD.VARIANT, cfg.OUTPUT_DIR, cfg.DATASETS.PROPOSAL_STORE = "text", str(folder), ""
        config = recorded_config(cfg)
        for key in ("DISTILL_WEIGHT", "NUM_DISTILL_PROPOSALS", "ENSEMBLE_LAMBDA"):  # no part of ViLD-text's training
            config["MODEL"]["VILD"].pop(key)
        inputs = {"config": config, "teacher": self.teacher.identity, "dataset": self.train_data}
        state = self.state("proposal_model", inputs, bool(checkpoints_newest_first(folder)),
                           f"delete {folder} to train it again, or use another OUTPUT_DIR")
        log = self.log("proposal_model")
        if state != "done":
            log.info("stage 1/4 proposal_model: %s ViLD-text on the base categories in %s",
                     "continuing" if state == "resume" else "training", folder)
            if state == "new":
                self.begin("proposal_model", inputs)
            Trainer(cfg, stage="proposal_model", teacher=self.teacher).train(resume=state == "resume", evaluate=False)
            self.finish("proposal_model", sha256=sha256_file(folder / "model_final.pth"))
        else:
            log.info("stage 1/4 proposal_model: reusing %s", folder / "model_final.pth")
        return {"checkpoint": str(folder / "model_final.pth"), "sha256": self.records["stages"]["proposal_model"]["sha256"]}

    def store(self) -> tuple[Path, dict]:
        """Stage 2: the CLIP proposal store (a given, existing DATASETS.PROPOSAL_STORE is used as it is)."""
        from ..data import ProposalStore
        given = self.cfg.DATASETS.PROPOSAL_STORE
        store_dir = Path(given) if given else self.out / "clip_proposals"
        if given and (store_dir / "meta.json").is_file() and "store" not in self.records["stages"]:
            meta = ProposalStore(store_dir).meta
            self.log("store").info("stage 1-2/4: using the given proposal store %s", store_dir)
            return store_dir, {"given": str(store_dir), **{k: meta.get(k) for k in (
                "teacher", "max_proposals", "image_ids_sha256", "num_shards")}}
        source = self.proposal_source()
        m = self.cfg.MODEL.VILD.NUM_DISTILL_PROPOSALS
        inputs = {"proposals": source, "teacher": self.teacher.identity, "dataset": self.train_data,
                  "max_proposals": m, "crop_scales": list(self.cfg.TEACHER.CROP_SCALES)}
        state = self.state("store", inputs, (store_dir / "meta.json").is_file(),
                           f"delete {store_dir} to fill it again")
        log = self.log("store")
        if state == "done":
            log.info("stage 2/4 store: reusing %s", store_dir)
            return store_dir, inputs
        if state == "new":
            if (store_dir / "meta.json").is_file():
                raise StageMismatch(f"{store_dir} holds a proposal store that {self.records_file} has no record of: "
                                    f"delete it to fill it again, or name it in DATASETS.PROPOSAL_STORE to use it as is")
            self.begin("store", inputs)
        log.info("stage 2/4 store: %s CLIP embeddings of %d proposals per training image into %s",
                 "continuing" if state == "resume" else "computing", m, store_dir)
        stats = self._fill_store(store_dir, source, m)
        MetricsWriter(self.out, enabled=comm.is_main_process(), tensorboard=False, stage="store").write(
            0, {"images_written": stats["written"], "images_unreadable": stats["unreadable"]})
        self.finish("store")
        return store_dir, inputs

    def _fill_store(self, store_dir: Path, source: dict, m: int) -> dict:
        from .precompute import load_proposal_model, load_proposals_json, precompute_clip_proposals
        model = load_proposal_model(source["checkpoint"], self.device) if "checkpoint" in source else None
        proposals = load_proposals_json(source["json"], m) if "json" in source else None
        stats = precompute_clip_proposals(self.cfg, self.teacher, store_dir, model=model, proposals=proposals,
                                          max_proposals=m)
        comm.synchronize()  # every rank's shard is complete before anyone trains on the store
        gathered = comm.all_gather_object(stats)
        return {k: sum(s[k] for s in gathered) for k in ("written", "unreadable")}

    def distill(self, store_dir: Path, store_inputs: dict) -> Any:
        """Stage 3: the configured variant trained with distillation; returns its Trainer (None when reused)."""
        from .trainer import Trainer
        cfg = self.cfg.clone()
        cfg.DATASETS.PROPOSAL_STORE = str(store_dir)
        inputs = {"config": recorded_config(cfg), "teacher": self.teacher.identity, "dataset": self.train_data,
                  "store": store_inputs}
        has_checkpoints = bool(checkpoints_newest_first(self.out))
        state = self.state("distill", inputs, has_checkpoints,
                           f"delete the checkpoints (model_*.pth) in {self.out} to train again, or use another "
                           f"OUTPUT_DIR")
        log = self.log("distill")
        if state == "done":
            log.info("stage 3/4 distill: reusing %s", self.out / "model_final.pth")
            return None
        resume = state == "resume" or (self.resume and "distill" not in self.records["stages"])
        log.info("stage 3/4 distill: %s %s with distillation from %s", "continuing" if resume else "training",
                 cfg.MODEL.VILD.VARIANT, store_dir)
        if state == "new":
            self.begin("distill", inputs)
        trainer = Trainer(cfg, stage="distill", teacher=self.teacher)
        trainer.train(resume=resume, evaluate=False)
        self.finish("distill")
        return trainer

    def evaluate(self, trainer: Any) -> dict:
        """Stage 4: DATASETS.TEST scored with the final weights (reused when the weights and test sets match)."""
        from ..teacher.clip_teacher import sha256_file
        from .calibration import calibrate_from_config
        from .hooks import flatten_metrics
        from .trainer import Trainer
        cfg = self.cfg
        if not cfg.DATASETS.TEST:
            self.log("evaluate").info("stage 4/4 evaluate: DATASETS.TEST is empty, nothing to evaluate")
            return {}
        final = self.out / "model_final.pth"
        if comm.is_main_process() and "calibration" not in load_checkpoint(final):
            # the display scoring of Detector / vild-detect: region mean and threshold (vild.engine.calibration)
            entry = calibrate_from_config(cfg, str(final))
            self.log("evaluate").info("calibrated %s: display threshold %.4g (F1 %.2f on %s)", final,
                                      entry["score_thresh"], entry["f1"], cfg.DATASETS.TEST[0])
        comm.synchronize()
        inputs = {"model_sha256": sha256_file(final), "test": [dataset_identity(cfg, n) for n in cfg.DATASETS.TEST],
                  "settings": json.loads(json.dumps(cfg.TEST.to_dict()))}
        rec = self.records["stages"].get("evaluate") or {}
        if rec.get("done") and rec["inputs"] == inputs:  # other weights or test sets: evaluated again
            self.log("evaluate").info("stage 4/4 evaluate: reusing the metrics in %s", self.records_file)
            return self.records["stages"]["evaluate"]["results"]
        self.begin("evaluate", inputs)
        if trainer is None:
            trainer = Trainer(cfg.clone(), stage="evaluate", teacher=self.teacher)
            trainer.resume_or_load(resume=True, evaluate_only=True)
        trainer.logger = self.log("evaluate")
        trainer.logger.info("stage 4/4 evaluate: %s on %s", final, ", ".join(cfg.DATASETS.TEST))
        results = trainer.test()
        if comm.is_main_process():
            max_iter = int(load_checkpoint(final)["iteration"])
            drop_replayed_lines(self.out / "metrics.jsonl", max_iter, redo_evaluation_at=max_iter)
            MetricsWriter(self.out, tensorboard=False, stage="evaluate").write(max_iter, flatten_metrics(results))
            trainer.plot_curves()
        self.finish("evaluate", results=results)
        return results
