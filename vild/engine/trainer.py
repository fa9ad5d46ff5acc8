"""The training loop: SGD or AdamW with warm-up, AMP, clipping, checkpoints, resume, logs, periodic evaluation."""
from __future__ import annotations

import json
import math
import random
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ..config import CfgNode
from ..modeling import ViLD, build_model
from ..utils import comm
from .checkpoint import (
    FORMAT_VERSION,
    UnreadableCheckpoint,
    atomic_save,
    check_teacher,
    checkpoints_newest_first,
    load_checkpoint,
    prune_checkpoints,
    remove_stale_temp_files,
    rng_state,
    set_rng_state,
    teacher_mismatch,
)
from .curves import plot_training_curves
from .distributed import init_distributed, resolve_device
from .logger import ETA, LossWindow, MetricsWriter, setup_logger

if TYPE_CHECKING:
    from ..data import DetectionDataset


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(cfg: CfgNode, iteration: int) -> float:
    """Learning-rate multiplier at an iteration: linear warm-up, then step decays or cosine."""
    s = cfg.SOLVER
    if s.LR_SCHEDULER == "step":
        f = s.GAMMA ** sum(iteration >= m for m in s.STEPS)
    elif s.LR_SCHEDULER == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * min(iteration / max(s.MAX_ITER, 1), 1.0)))
    else:
        raise ValueError(f"unknown SOLVER.LR_SCHEDULER {s.LR_SCHEDULER!r}: use step or cosine")
    if iteration < s.WARMUP_ITERS:
        alpha = iteration / s.WARMUP_ITERS
        f *= s.WARMUP_FACTOR * (1 - alpha) + alpha
    return f


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

    def _match_mask_head(self, ckpt: dict, source: str | Path) -> None:
        """Drop this model's mask head when the checkpoint's config says it was trained without one."""
        if self.cfg.MODEL.MASK_ON and ((ckpt.get("cfg") or {}).get("MODEL") or {}).get("MASK_ON") is False:
            self._build_without_masks(f"{source} was trained on boxes only")

    def _load_weights(self, state: dict, source: str | Path) -> None:
        """Load a state dict; a mask head present on only one side (masks vs. box-only training) is logged, not fatal."""
        model = unwrap(self.model)
        own = model.state_dict()
        extra, missing = [k for k in state if k not in own], [k for k in own if k not in state]
        if not (extra or missing) or not all(k.startswith("roi_heads.mask_") for k in extra + missing):
            model.load_state_dict(state)  # a real mismatch: torch's error lists the keys
            return
        if extra:
            self.logger.info("%s has a mask head, this model none (MODEL.MASK_ON False): its mask weights are left out",
                             source)
        if missing:
            self.logger.info("%s has no mask head: this model's mask head starts untrained", source)
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

    def _check_store_teacher(self, store) -> None:
        why = teacher_mismatch(store.teacher or {}, self.teacher.identity)
        if why:
            raise ValueError(f"proposal store {self.cfg.DATASETS.PROPOSAL_STORE} {why}: recompute the store or "
                             f"point TEACHER.* at the same weights")

    def set_vocabulary(self, names: list, base_mask: list[bool] | None) -> None:
        """Embed ``names`` with the teacher and install them as the model's vocabulary."""
        emb = self.teacher.encode_text(names).to(self.device)
        mask = torch.tensor(base_mask, dtype=torch.bool) if base_mask is not None else None
        unwrap(self.model).set_vocabulary(emb, mask)

    # ---- training ---------------------------------------------------------------------------
    def _newest_readable_checkpoint(self) -> tuple[Path, dict] | None:
        """The newest checkpoint of OUTPUT_DIR that loads, passing over (and naming) unreadable newer ones."""
        found = checkpoints_newest_first(self.output_dir)
        bad = []
        for path in found:
            try:
                # on the CPU: the RNG states must stay CPU tensors; weights and optimizer state move to the device
                ckpt = load_checkpoint(path, map_location="cpu")
            except UnreadableCheckpoint as e:
                self.logger.warning("%s", e)
                bad.append(path)
                continue
            if bad:
                self.logger.warning("resuming from %s instead of the unreadable %s (a write was cut off?)", path.name,
                                    ", ".join(p.name for p in bad))
            return path, ckpt
        if bad:
            raise UnreadableCheckpoint(
                f"--resume: no checkpoint in {self.output_dir} can be read ({', '.join(p.name for p in bad)} "
                f"truncated or corrupt); delete {'them' if len(bad) > 1 else 'it'} to start afresh, or point "
                f"OUTPUT_DIR at another run")
        return None

    def resume_or_load(self, resume: bool, evaluate_only: bool = False) -> int:
        """Load MODEL.WEIGHTS, or with ``resume`` the newest checkpoint in OUTPUT_DIR; return the start iteration.

        A newest checkpoint that cannot be read (a write cut off by a kill) is passed over for the one before.
        A checkpoint trained without masks is resumed (or, ``evaluate_only``, evaluated) without a mask head.
        """
        found = self._newest_readable_checkpoint() if resume else None
        self._resume_state = None
        if found is not None:
            path, ckpt = found
            check_teacher(ckpt.get("teacher") or {}, self.teacher.identity, path, self._teacher_fix)
            self._match_mask_head(ckpt, path)
            unwrap(self.model).load_state_dict(ckpt["model"])
            self._resume_state = ckpt
            self.logger.info("resuming from %s at iteration %d", path, ckpt["iteration"])
            return int(ckpt["iteration"])
        if resume:
            self.logger.info("--resume: no checkpoint in %s, starting from scratch", self.output_dir)
        if self.cfg.MODEL.WEIGHTS:
            ckpt = load_checkpoint(self.cfg.MODEL.WEIGHTS, map_location="cpu")
            check_teacher(ckpt.get("teacher") or {}, self.teacher.identity, self.cfg.MODEL.WEIGHTS,
                          self._teacher_fix)
            if evaluate_only:
                self._match_mask_head(ckpt, self.cfg.MODEL.WEIGHTS)
            self._load_weights(ckpt["model"], self.cfg.MODEL.WEIGHTS)
            self.logger.info("loaded weights from %s", self.cfg.MODEL.WEIGHTS)
        return 0

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
        from ..data import batch_to_device, build_train_loader
        cfg, log = self.cfg, self.logger
        dataset = self.train_dataset()
        if cfg.MODEL.MASK_ON and not dataset.has_masks:
            self._drop_mask_head(dataset)
        self.vocabulary = dataset.category_names
        self.set_vocabulary(self.vocabulary, [True] * len(self.vocabulary))
        start_iter = self.resume_or_load(resume)
        self._wrap_ddp()
        optimizer = build_optimizer(cfg, self.model)
        scaler = torch.amp.GradScaler("cuda") if cfg.SOLVER.AMP == "fp16" else None
        if self._resume_state is not None:
            if self._resume_state.get("optimizer"):
                optimizer.load_state_dict(self._resume_state["optimizer"])
            if scaler is not None and "scaler" in self._resume_state:
                scaler.load_state_dict(self._resume_state["scaler"])
            self._restore_rng(self._resume_state["rng"], start_iter)
        loader = build_train_loader(cfg, dataset, start_iter=start_iter, pin_memory=self.device.type == "cuda")
        max_iter = cfg.SOLVER.MAX_ITER
        # a resumed run logs its iterations after start_iter again, and evaluates again at the end
        writer = MetricsWriter(self.output_dir, enabled=comm.is_main_process(), start_iter=start_iter,
                               redo_evaluation_at=max_iter, stage=self.stage)
        log.info("training %s (%s) on %d categories for %d iterations, %d process(es) on %s",
                 cfg.MODEL.VILD.VARIANT, cfg.MODEL.BACKBONE.NAME, len(self.vocabulary), max_iter,
                 self.world_size, self.device)
        self.model.train()
        eta = ETA(start_iter, max_iter)
        window = LossWindow()
        it = start_iter
        data_iter = iter(loader)
        for it in range(start_iter, max_iter):
            for g in optimizer.param_groups:
                g["lr"] = cfg.SOLVER.BASE_LR * lr_factor(cfg, it)
            images, targets = batch_to_device(*next(data_iter), self.device)
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
            window.add(losses)
            last = it + 1 == max_iter
            log_now = _every(cfg.SOLVER.LOG_PERIOD, it) or last
            save_now = _every(cfg.SOLVER.CHECKPOINT_PERIOD, it) or last
            if log_now or save_now:
                # the one host sync of a logged step; every rank sees the same means, so a non-finite
                # loss stops all of them together, and before a checkpoint could keep its weights
                means = window.mean(reset=log_now)
                if not all(math.isfinite(v) for v in means.values()):
                    raise FloatingPointError(
                        f"loss became non-finite by iteration {it + 1}: {means}; lower SOLVER.BASE_LR, "
                        f"set SOLVER.CLIP_GRADIENTS, or lengthen SOLVER.WARMUP_ITERS")
            if log_now:
                spi, left = eta(it)
                scalars = {**means, "lr": optimizer.param_groups[0]["lr"], "sec_per_iter": spi}
                writer.write(it + 1, scalars)
                log.info("iter %d/%d  loss %.3f  (%s)  lr %.2e  %.2fs/it  eta %s", it + 1, max_iter,
                         scalars["total_loss"], "  ".join(f"{k} {scalars[k]:.3f}" for k in losses), scalars["lr"],
                         spi, left)
            if save_now:
                self._checkpoint(it + 1, optimizer, scaler, final=last)
            eval_now = _every(cfg.TEST.EVAL_PERIOD, it) and not last  # the last one comes after the loop
            if eval_now:
                writer.write(it + 1, _flatten(self.test()))
                self.set_vocabulary(self.vocabulary, [True] * len(self.vocabulary))
                self.model.train()
            if save_now or eval_now:
                eta.restart(it + 1)
        writer.close()
        results = self.test() if cfg.DATASETS.TEST and evaluate else {}
        if results:
            writer = MetricsWriter(self.output_dir, enabled=comm.is_main_process(), tensorboard=False,
                                   stage=self.stage)
            writer.write(max_iter, _flatten(results))
        self._plot_curves()
        return results

    def _checkpoint(self, iteration: int, optimizer, scaler, final: bool) -> None:
        rngs = comm.gather_object(rng_state())  # each rank resumes its own random stream
        if comm.is_main_process():
            name = "model_final.pth" if final else f"model_{iteration:07d}.pth"
            save_training_checkpoint(self.output_dir / name, self.cfg, self.model, optimizer, iteration,
                                     self.teacher.identity, self.vocabulary, scaler, rngs)
            self.logger.info("saved %s", self.output_dir / name)
            for old in prune_checkpoints(self.output_dir, self.cfg.SOLVER.KEEP_CHECKPOINTS):
                self.logger.info("removed %s (SOLVER.KEEP_CHECKPOINTS %d)", old.name, self.cfg.SOLVER.KEEP_CHECKPOINTS)
            self._plot_curves()
        comm.synchronize()

    def _plot_curves(self) -> None:
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
        """Evaluate on every DATASETS.TEST dataset with its own full vocabulary.

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
            self.set_vocabulary(ds.category_names, ds.base_mask)
            evaluators = [build_evaluator(d, self.output_dir / "inference" / n,
                                          per_category=self.cfg.TEST.PER_CATEGORY_TABLE) for n, d in members]
            metrics = inference_on_dataset(unwrap(self.model), build_test_loader(self.cfg, ds), evaluators,
                                           self.device, autocast_context(self.cfg, self.device))
            for (name, _), m in zip(members, metrics):
                results[name] = m
                if comm.is_main_process():
                    self.logger.info("%s: %s", name, {k: (round(v, 2) if isinstance(v, float) else v)
                                                      for k, v in _flatten(m).items()})
        return {name: results[name] for name in self.cfg.DATASETS.TEST}


def _every(period: int, it: int) -> bool:
    """Whether iteration ``it`` (0-based) ends a period; a period of 0 means never."""
    return period > 0 and (it + 1) % period == 0


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


