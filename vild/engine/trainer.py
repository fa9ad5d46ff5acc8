"""Training and evaluation from a config: ``Trainer.run_step`` (one optimisation step: SGD or AdamW, AMP,
clipping) between the hooks of ``hooks.py`` (schedule, logs, checkpoints, evaluation); resume and MODEL.WEIGHTS."""
from __future__ import annotations

import json
import math
import random
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ..config import CfgNode
from ..modeling import ViLD, build_model
from ..modeling.classifier import ClassifierVocabulary
from ..utils import comm
from .checkpoint import (
    FORMAT_VERSION,
    ModelCheckpoint,
    UnreadableCheckpoint,
    atomic_save,
    checkpoints_newest_first,
    remove_stale_temp_files,
    rng_state,
    set_rng_state,
    teacher_mismatch,
)
from .curves import plot_training_curves
from .distributed import init_distributed, resolve_device
from .hooks import (
    Hook,
    LoopState,
    LRSchedule,
    MetricsLogger,
    PeriodicCheckpointer,
    PeriodicEvaluator,
    flatten_metrics,
)
from .logger import ETA, MetricsWriter, setup_logger

if TYPE_CHECKING:
    from ..data import DetectionDataset


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZER (SGD with momentum, or AdamW); norms and biases are not decayed (detectron2's default)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.SOLVER.WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    name = cfg.SOLVER.OPTIMIZER
    if name == "SGD":
        return torch.optim.SGD(groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM)
    if name == "AdamW":
        try:  # the fused kernel steps all tensors at once (6x faster than the per-tensor loop on a CPU)
            return torch.optim.AdamW(groups, lr=cfg.SOLVER.BASE_LR, betas=(0.9, 0.999), fused=True)
        except (RuntimeError, TypeError):  # a device or dtype the fused kernel does not support
            return torch.optim.AdamW(groups, lr=cfg.SOLVER.BASE_LR, betas=(0.9, 0.999))
    raise ValueError(f"unknown SOLVER.OPTIMIZER {name!r}: use SGD or AdamW")


def autocast_context(cfg: CfgNode, device: torch.device) -> AbstractContextManager:
    """bf16/fp16 autocast as SOLVER.AMP asks (fp16 only on CUDA)."""
    amp = cfg.SOLVER.AMP
    if not amp:
        return nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"unknown SOLVER.AMP {amp!r}: use '', bf16 or fp16")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("SOLVER.AMP fp16 needs a GPU; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def unwrap(model: torch.nn.Module) -> ViLD:
    """The ViLD module inside a DDP wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def save_training_checkpoint(path: Path, cfg: CfgNode, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             iteration: int, teacher_identity: dict, vocabulary: list,
                             scaler: torch.amp.GradScaler | None = None, rng: list[dict] | None = None) -> None:
    """Write a self-describing, resumable checkpoint (rank 0 only); ``rng``: every rank's RNG state, by rank."""
    state = {
        "format_version": FORMAT_VERSION,
        "model": unwrap(model).state_dict(),
        "cfg": cfg.to_dict(),
        "teacher": teacher_identity,
        "vocabulary": vocabulary,
        "iteration": iteration,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng if rng is not None else [rng_state()],
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    atomic_save(state, path)


@dataclass
class ResumeState:
    """Where training starts (``Trainer.resume_or_load``): the iteration, and the resumed checkpoint whose
    optimizer, grad-scaler and RNG states the run continues with (None: a fresh start)."""

    iteration: int = 0
    checkpoint: dict | None = None


class Trainer:
    """Builds everything a run needs from a config and runs the loop (``train``) or evaluation (``test``).

    ``stage``: the pipeline stage this run is (``tools/train_net.py`` runs several); console lines start with
    it and every ``metrics.jsonl`` line carries it.
    """

    def __init__(self, cfg: CfgNode, stage: str = "", teacher=None):
        """``teacher``: a loaded ``CLIPTeacher`` of TEACHER.* to share (default: load one)."""
        self.cfg = cfg
        self.stage = stage
        self.device = resolve_device(cfg.MODEL.DEVICE)
        init_distributed(self.device)
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        self.output_dir = Path(cfg.OUTPUT_DIR)
        if comm.is_main_process():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(cfg.dump())
        self.logger = setup_logger(self.output_dir, self.rank, stage=stage)
        if comm.is_main_process():
            stale = remove_stale_temp_files(self.output_dir)
            if stale:
                self.logger.info("removed %d temporary checkpoint file(s) of an interrupted write: %s", len(stale),
                                 ", ".join(p.name for p in stale))
        seed_everything(cfg.SEED + self.rank)
        if teacher is None:
            from ..teacher import CLIPTeacher  # heavy import kept out of module import time
            teacher = CLIPTeacher.from_config(cfg, self.device)
        self.teacher = teacher
        self.model = build_model(cfg, teacher=self.teacher).to(self.device)
        # time.perf_counter() when the last training step ended (before the final evaluation): training's cost
        self.train_ended_at: float | None = None

    # ---- data ---------------------------------------------------------------------------------
    def train_dataset(self) -> DetectionDataset:
        """The training dataset (base annotations only) with its proposal store when the variant distills."""
        from ..data import ProposalStore, build_dataset
        cfg = self.cfg
        if len(cfg.DATASETS.TRAIN) != 1:
            raise ValueError(f"DATASETS.TRAIN must name one dataset; got {cfg.DATASETS.TRAIN}")
        store = None
        if cfg.MODEL.VILD.VARIANT in ("vild", "ensemble"):
            if cfg.DATASETS.PROPOSAL_STORE:
                store = ProposalStore(cfg.DATASETS.PROPOSAL_STORE)
                self._check_store_teacher(store)
            else:
                self.logger.warning("DATASETS.PROPOSAL_STORE is empty: training %s without distillation "
                                    "(make a store with tools/precompute_clip.py)", cfg.MODEL.VILD.VARIANT)
        ds = build_dataset(cfg, cfg.DATASETS.TRAIN[0], train=True, proposal_store=store)
        if store is not None:
            missing = sum(int(i not in store) for i in ds.image_ids)
            self.logger.info("proposal store %s: %d of %d training images have CLIP proposals, %d train without "
                             "distillation", cfg.DATASETS.PROPOSAL_STORE, len(ds.image_ids) - missing,
                             len(ds.image_ids), missing)
        return ds

    def _drop_mask_head(self, dataset: DetectionDataset) -> None:
        """Box-only training data: train and save a model without a mask head (MODEL.MASK_ON False)."""
        self._build_without_masks(f"no annotation of {dataset.name} has a segmentation: training boxes only")
        dataset.load_masks = False

    def _build_without_masks(self, why: str) -> None:
        self.logger.info("%s, without a mask head (MODEL.MASK_ON False); the model detects without masks", why)
        self.cfg.MODEL.MASK_ON = False
        seed_everything(self.cfg.SEED + self.rank)  # the same initial weights as a run configured without masks
        self.model = build_model(self.cfg).to(self.device)
        if comm.is_main_process():
            (self.output_dir / "config.yaml").write_text(self.cfg.dump())

    def _match_mask_head(self, ckpt: ModelCheckpoint) -> None:
        """Drop this model's mask head when the checkpoint's config says it was trained without one."""
        if self.cfg.MODEL.MASK_ON and not ckpt.has_mask_head:
            self._build_without_masks(f"{ckpt.path} was trained on boxes only")

    def _check_store_teacher(self, store) -> None:
        why = teacher_mismatch(store.teacher or {}, self.teacher.identity)
        if why:
            raise ValueError(f"proposal store {self.cfg.DATASETS.PROPOSAL_STORE} {why}: recompute the store or "
                             f"point TEACHER.* at the same weights")

    def _embed(self, names: list, base_mask: list[bool] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        emb = self.teacher.encode_text(names).to(self.device)
        return emb, torch.tensor(base_mask, dtype=torch.bool) if base_mask is not None else None

    def set_vocabulary(self, names: list, base_mask: list[bool] | None) -> None:
        """Embed ``names`` with the teacher and install them as the model's vocabulary (training's)."""
        unwrap(self.model).set_vocabulary(*self._embed(names, base_mask))

    def embed_vocabulary(self, names: list, base_mask: list[bool] | None) -> ClassifierVocabulary:
        """Embed ``names`` with the teacher as a vocabulary for calls of the model; the installed one stays."""
        return unwrap(self.model).make_vocabulary(*self._embed(names, base_mask))

    # ---- training ---------------------------------------------------------------------------
    def _newest_readable_checkpoint(self) -> ModelCheckpoint | None:
        """The newest checkpoint of OUTPUT_DIR that loads, passing over (and naming) unreadable newer ones."""
        found = checkpoints_newest_first(self.output_dir)
        bad = []
        for path in found:
            try:
                # read onto the CPU: the RNG states must stay CPU tensors; weights and optimizer state move later
                ckpt = ModelCheckpoint(path)
            except UnreadableCheckpoint as e:
                self.logger.warning("%s", e)
                bad.append(path)
                continue
            if bad:
                self.logger.warning("resuming from %s instead of the unreadable %s (a write was cut off?)", path.name,
                                    ", ".join(p.name for p in bad))
            return ckpt
        if bad:
            raise UnreadableCheckpoint(
                f"--resume: no checkpoint in {self.output_dir} can be read ({', '.join(p.name for p in bad)} "
                f"truncated or corrupt); delete {'them' if len(bad) > 1 else 'it'} to start afresh, or point "
                f"OUTPUT_DIR at another run")
        return None

    def resume_or_load(self, resume: bool, evaluate_only: bool = False) -> ResumeState:
        """Load MODEL.WEIGHTS, or with ``resume`` the newest checkpoint in OUTPUT_DIR; return where training starts.

        A newest checkpoint that cannot be read (a write cut off by a kill) is passed over for the one before.
        A checkpoint trained without masks is resumed (or, ``evaluate_only``, evaluated) without a mask head;
        MODEL.WEIGHTS with a mask head on one side only loads the rest (fine-tuning on box-only data).
        """
        found = self._newest_readable_checkpoint() if resume else None
        if found is not None:
            found.check_teacher(self.teacher.identity, self._teacher_fix)
            self._match_mask_head(found)
            found.load_into(unwrap(self.model), self.logger)
            self.logger.info("resuming from %s at iteration %d", found.path, found.data["iteration"])
            return ResumeState(int(found.data["iteration"]), found.data)
        if resume:
            self.logger.info("--resume: no checkpoint in %s, starting from scratch", self.output_dir)
        if self.cfg.MODEL.WEIGHTS:
            weights = ModelCheckpoint(self.cfg.MODEL.WEIGHTS)
            weights.check_teacher(self.teacher.identity, self._teacher_fix)
            if evaluate_only:
                self._match_mask_head(weights)
            weights.load_into(unwrap(self.model), self.logger, mask_head_may_differ=True)
            self.logger.info("loaded weights from %s", self.cfg.MODEL.WEIGHTS)
        return ResumeState()

    _teacher_fix = "point TEACHER.MODEL / TEACHER.PRETRAINED at the teacher it was trained with"

    def _restore_rng(self, saved: list | dict, start_iter: int) -> None:
        """Give each rank its own saved RNG state back; a different world size gets fresh per-rank seeds."""
        states = saved if isinstance(saved, list) else [saved]  # format 1 saved rank 0's state only
        if len(states) == self.world_size:
            set_rng_state(states[self.rank])
        else:
            self.logger.info("checkpoint holds RNG states of %d rank(s), this run has %d: reseeding each rank",
                             len(states), self.world_size)
            seed_everything(self.cfg.SEED + self.rank + start_iter)

    def _wrap_ddp(self) -> None:
        if self.world_size == 1:
            return
        cfg, model = self.cfg, unwrap(self.model)
        for part, norm in ((model.backbone, cfg.MODEL.BACKBONE.NORM), (model.roi_heads, cfg.MODEL.ROI_BOX_HEAD.NORM)):
            if norm != "SyncBN":
                continue  # a part configured as BN keeps per-process statistics
            if self.device.type != "cuda":
                self.logger.warning("SyncBN runs on CUDA only: on %s each process keeps its own BatchNorm "
                                    "statistics", self.device.type)
                continue
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(part)  # converts the part's layers in place
            self.logger.info("SyncBN across %d processes in the %s", self.world_size,
                             "backbone" if part is model.backbone else "RoI heads")
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)

    def train(self, resume: bool = False, evaluate: bool = True) -> dict:
        """Run SOLVER.MAX_ITER iterations (continuing a checkpoint with ``resume``), then evaluate (``evaluate``)."""
        dataset = self.train_dataset()
        if self.cfg.MODEL.MASK_ON and not dataset.has_masks:
            self._drop_mask_head(dataset)
        return self.train_from(self.resume_or_load(resume), dataset, evaluate)

    def train_from(self, start: ResumeState, dataset: DetectionDataset, evaluate: bool = True) -> dict:
        """The loop on ``dataset`` from ``start`` (``resume_or_load``'s): each step between the hooks, then the
        final evaluation's metrics (with ``evaluate``)."""
        from ..data import build_train_loader
        cfg = self.cfg
        self.vocabulary = dataset.category_names  # installed on the model that resume_or_load left
        self.set_vocabulary(self.vocabulary, [True] * len(self.vocabulary))
        self._wrap_ddp()
        optimizer, scaler = self._optimizer(start)
        loader = build_train_loader(cfg, dataset, start_iter=start.iteration, pin_memory=self.device.type == "cuda")
        # a resumed run logs its iterations after the start again, and evaluates again at the end
        writer = MetricsWriter(self.output_dir, enabled=comm.is_main_process(), start_iter=start.iteration,
                               redo_evaluation_at=cfg.SOLVER.MAX_ITER, stage=self.stage)
        self.logger.info("training %s (%s) on %d categories for %d iterations, %d process(es) on %s",
                         cfg.MODEL.VILD.VARIANT, cfg.MODEL.BACKBONE.NAME, len(self.vocabulary), cfg.SOLVER.MAX_ITER,
                         self.world_size, self.device)
        self.model.train()
        state = LoopState(start.iteration, cfg.SOLVER.MAX_ITER, optimizer, scaler, writer,
                          ETA(start.iteration, cfg.SOLVER.MAX_ITER))
        hooks = self.build_hooks(evaluate)
        batches = iter(loader)
        for it in range(state.start_iter, state.max_iter):
            state.iteration = it
            for hook in hooks:
                hook.before_step(state)
            self.run_step(state, next(batches), check=any(hook.needs_checked_losses(state) for hook in hooks))
            for hook in hooks:
                hook.after_step(state)
        self.train_ended_at = time.perf_counter()
        writer.close()
        for hook in hooks:
            hook.after_train(state)
        self.plot_curves()
        return state.results

    def _optimizer(self, start: ResumeState) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler | None]:
        """SOLVER.OPTIMIZER and, for fp16 AMP, a grad scaler; a resumed run's states (and RNG) restored."""
        optimizer = build_optimizer(self.cfg, self.model)
        scaler = torch.amp.GradScaler("cuda") if self.cfg.SOLVER.AMP == "fp16" else None
        ckpt = start.checkpoint
        if ckpt is not None:
            if ckpt.get("optimizer"):
                optimizer.load_state_dict(ckpt["optimizer"])
            if scaler is not None and "scaler" in ckpt:
                scaler.load_state_dict(ckpt["scaler"])
            self._restore_rng(ckpt["rng"], start.iteration)
        return optimizer, scaler

    def build_hooks(self, evaluate: bool = True) -> list[Hook]:
        """The work around each step, in the order it runs: schedule, logs, checkpoints, evaluation."""
        s = self.cfg.SOLVER
        return [LRSchedule(self.cfg), MetricsLogger(s.LOG_PERIOD, self.logger),
                PeriodicCheckpointer(self, s.CHECKPOINT_PERIOD, s.KEEP_CHECKPOINTS),
                PeriodicEvaluator(self, self.cfg.TEST.EVAL_PERIOD, final=evaluate)]

    def run_step(self, state: LoopState, batch: tuple, check: bool) -> None:
        """One optimisation step: forward, losses, backward (scaled under fp16 AMP), clipping, optimizer step.

        The losses go into ``state.losses`` and ``state.window``. With ``check`` (a step whose hooks log or save),
        the window's means over all ranks are read into ``state.means`` (the step's one host sync, so every
        rank stops together on a non-finite loss, before a checkpoint could keep its weights).
        """
        from ..data import batch_to_device
        cfg, optimizer, scaler = self.cfg, state.optimizer, state.scaler
        images, targets = batch_to_device(*batch, self.device)
        with autocast_context(cfg, self.device):
            losses = self.model(images, targets)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
        else:
            total.backward()
        if cfg.SOLVER.CLIP_GRADIENTS > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.SOLVER.CLIP_GRADIENTS)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        state.losses = losses
        state.window.add(losses)
        state.means = state.window.mean(reset=False) if check else None
        if state.means is not None and not all(math.isfinite(v) for v in state.means.values()):
            raise FloatingPointError(
                f"loss became non-finite by iteration {state.iteration + 1}: {state.means}; lower SOLVER.BASE_LR, "
                f"set SOLVER.CLIP_GRADIENTS, or lengthen SOLVER.WARMUP_ITERS")

    def save_checkpoint(self, iteration: int, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                        final: bool = False) -> Path | None:
        """Write ``model_NNNNNNN.pth`` (``model_final.pth`` with ``final``) holding every rank's RNG state.

        Every rank calls it (the RNG states are gathered); rank 0 writes and gets the path, the others None.
        """
        rngs = comm.gather_object(rng_state())  # each rank resumes its own random stream
        if not comm.is_main_process():
            return None
        path = self.output_dir / ("model_final.pth" if final else f"model_{iteration:07d}.pth")
        save_training_checkpoint(path, self.cfg, self.model, optimizer, iteration, self.teacher.identity,
                                 self.vocabulary, scaler, rngs)
        self.logger.info("saved %s", path)
        return path

    def plot_curves(self) -> None:
        """Redraw OUTPUT_DIR/training_curves.png; a plotting problem is logged, never ends a training run."""
        metrics = self.output_dir / "metrics.jsonl"
        if not comm.is_main_process() or not metrics.is_file():
            return
        try:
            plot_training_curves(metrics)
        except Exception as e:  # noqa: BLE001 -- a picture must not end a days-long run; the log keeps the cause
            self.logger.warning("could not draw training curves from %s: %r", metrics, e)

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def test(self) -> dict:
        """Evaluate on every DATASETS.TEST dataset with its own full vocabulary, passed to the model per call:
        the vocabulary installed for training stays as it is.

        Datasets over the same images and categories (one JSON scored by both the LVIS and the COCO
        evaluator, say) share one inference pass.
        """
        from ..data import build_dataset, build_test_loader
        from ..evaluation import build_evaluator
        from .inference import inference_on_dataset
        groups: dict[tuple, list] = {}
        for name in self.cfg.DATASETS.TEST:
            ds = build_dataset(self.cfg, name, train=False, masks=False)  # scored against the json
            key = (str(ds.image_root), tuple(ds.image_ids), tuple(ds.category_ids),
                   json.dumps(ds.category_names), tuple(ds.base_mask))
            groups.setdefault(key, []).append((name, ds))
        results = {}
        for members in groups.values():
            ds = members[0][1]
            evaluators = [build_evaluator(d, self.output_dir / "inference" / n,
                                          per_category=self.cfg.TEST.PER_CATEGORY_TABLE) for n, d in members]
            metrics = inference_on_dataset(unwrap(self.model), build_test_loader(self.cfg, ds), evaluators,
                                           self.device, autocast_context(self.cfg, self.device),
                                           vocabulary=self.embed_vocabulary(ds.category_names, ds.base_mask))
            for (name, _), m in zip(members, metrics):
                results[name] = m
                if comm.is_main_process():
                    self.logger.info("%s: %s", name, {k: (round(v, 2) if isinstance(v, float) else v)
                                                      for k, v in flatten_metrics(m).items()})
        return {name: results[name] for name in self.cfg.DATASETS.TEST}

