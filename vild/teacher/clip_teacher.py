"""The frozen CLIP teacher (open_clip): cached text embeddings and region embeddings of boxes."""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align
from tqdm import tqdm

from ..utils.atomic import atomic_save
from .templates import fill_template, get_templates, prompt_plan
from .text_encoder import can_truncate, encode_prompts
from .vocabulary import clean_name, parse_vocabulary

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
# Registered at import so our JSON names work everywhere open_clip takes a model name.
open_clip.add_model_config(MODEL_CONFIG_DIR)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


def default_cache_dir() -> Path:
    """$VILD_CACHE, else ~/.cache/vild."""
    return Path(os.environ.get("VILD_CACHE") or Path.home() / ".cache" / "vild")


def sha256_file(path: Union[str, os.PathLike], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so big checkpoints don't fill memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _create_model(name: str, pretrained: Optional[str], device: torch.device) -> nn.Module:
    """open_clip.create_model with errors that say what to do instead."""
    if ":" not in name and name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.4)
        raise ValueError(f"unknown open_clip model {name!r}; close names: {close} "
                         "(all names: open_clip.list_models())")
    if not pretrained:
        return open_clip.create_model(name, pretrained=None, device=device)
    if os.path.isfile(pretrained):
        return open_clip.create_model(name, pretrained=pretrained, device=device)
    tags = open_clip.list_pretrained_tags_by_model(name)
    hint = "pass a local weights file with TEACHER.PRETRAINED /path/to/file"
    tag = next((t for t in tags if t.lower() == pretrained.lower()), None)
    if tag is not None:
        # OpenAI's weights were trained with QuickGELU; open_clip builds e.g. ViT-B-32 with GELU unless told
        quick = bool((open_clip.get_pretrained_cfg(name, tag) or {}).get("quick_gelu", False))
        try:
            return open_clip.create_model(name, pretrained=tag, device=device, force_quick_gelu=quick)
        except RuntimeError as e:
            raise RuntimeError(f"could not download open_clip weights {name!r}/{pretrained!r} "
                               f"(no internet, or set HF_HUB_OFFLINE=1 to fail fast): {hint}") from e
    if os.sep in pretrained or "/" in pretrained or pretrained.endswith(_WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"teacher weights file not found: {pretrained} (looked in {os.getcwd()} and, for a "
                                f"checkpoint, beside it): put the file there or set TEACHER.PRETRAINED to its path")
    raise ValueError(f"unknown pretrained tag {pretrained!r} for {name!r}; tags: {tags}; or {hint}")


class CLIPTeacher(nn.Module):
    """A frozen open_clip model that embeds category names and image regions.

    ``pretrained`` is an open_clip tag, a local weights file, or ""/None for random
    weights (tests, synthetic experiments). Outputs are float32 on the CPU.
    Text embeddings are cached as files in ``cache_dir``; with ``write_cache = False`` existing files are
    still read but no new ones are written (a server, whose requests choose the names, sets that).
    """

    PROGRESS_DELAY_S = 2.0  # a cold text encoding longer than this shows a progress bar with its ETA

    def __init__(self, model_name: str, pretrained: Optional[str], device: Union[str, torch.device] = "cpu",
                 templates: Union[str, Sequence[str]] = "vild", cache_dir: Optional[str] = None,
                 crop_scales: Sequence[float] = (1.0, 1.5), batch_size: int = 256):
        super().__init__()
        self.device = torch.device(device)
        self.model_name = model_name
        self.pretrained = pretrained or ""
        if os.path.isfile(self.pretrained):
            self.pretrained = os.path.abspath(self.pretrained)
        self.model = _create_model(model_name, self.pretrained, self.device).eval().requires_grad_(False)
        # part of the identity: the same weights under GELU and QuickGELU give different embeddings
        self._quick_gelu = any(type(m).__name__ == "QuickGELU" for m in self.model.modules())
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.templates = get_templates(templates) if isinstance(templates, str) else list(templates)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.crop_scales = tuple(float(s) for s in crop_scales)
        self.batch_size = int(batch_size)
        self.write_cache = True
        self.cache_hits = 0
        self.cache_misses = 0
        self._sha256: Optional[str] = None
        # Probed once: model classes (CLIP, CustomTextCLIP, timm towers) store D in different places.
        with torch.no_grad():
            self._embed_dim = int(self.model.encode_text(self.tokenizer(["a"]).to(self.device)).shape[-1])
        self._truncate_prompts = can_truncate(self.model)

        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        size = getattr(self.model.visual, "image_size", None) or cfg.get("size", 224)
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.register_buffer("mean", torch.tensor(cfg.get("mean", OPENAI_MEAN), device=self.device).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", OPENAI_STD), device=self.device).view(1, 3, 1, 1),
                             persistent=False)

    @classmethod
    def from_config(cls, cfg: Any, device: Union[str, torch.device] = "cpu") -> "CLIPTeacher":
        """Build from ``cfg.TEACHER``: MODEL, PRETRAINED, TEMPLATES, CACHE_DIR, CROP_SCALES, BATCH_SIZE."""
        t = cfg.TEACHER
        return cls(t.MODEL, t.PRETRAINED, device=device, templates=t.TEMPLATES, cache_dir=t.CACHE_DIR or None,
                   crop_scales=t.CROP_SCALES, batch_size=t.BATCH_SIZE)

    def train(self, mode: bool = True) -> "CLIPTeacher":
        """The teacher stays in eval mode whatever its parent does."""
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        """Dimension D of the joint embedding space."""
        return self._embed_dim

    @property
    def identity(self) -> dict:
        """{"model", "pretrained", "sha256", "quick_gelu"}: which weights and activation produced the embeddings."""
        if self._sha256 is None:
            if os.path.isfile(self.pretrained):
                self._sha256 = sha256_file(self.pretrained)
            elif not self.pretrained:
                # Random weights: fingerprint the tensors so caches never mix two random inits.
                h = hashlib.sha256()
                for k, v in self.model.state_dict().items():
                    h.update(k.encode())
                    h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
                self._sha256 = h.hexdigest()
        return {"model": self.model_name, "pretrained": self.pretrained, "sha256": self._sha256,
                "quick_gelu": self._quick_gelu}

    def forget_identity(self) -> None:
        """Forget the weights' fingerprint, so that the next ``identity`` hashes them again (after an in-place change)."""
        self._sha256 = None

    def autocast(self) -> torch.autocast:
        """The precision the towers run in: a context of bf16 autocast on CUDA, of no autocast elsewhere."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    # ---- text ----------------------------------------------------------------------------
    def text_cache_path(self, vocab: list[list[str]]) -> Path:
        """Cache file for these names under this model and template set."""
        blob = json.dumps({"identity": self.identity, "templates": self.templates, "names": vocab})
        return self.cache_dir / f"text_{hashlib.sha256(blob.encode()).hexdigest()}.pt"

    @torch.no_grad()
    def encode_text(self, names: Sequence[Union[str, Sequence[str]]]) -> Tensor:
        """[K, D] L2-normalised embeddings; entry k is a name, "a|b", or a synonym list."""
        vocab = parse_vocabulary(names, dedupe=False) if not isinstance(names, str) else parse_vocabulary(names)
        if not isinstance(names, str) and len(vocab) != len(names):
            raise ValueError("every vocabulary entry needs a non-blank name (a blank would shift label indices)")
        synonyms = [clean_name(s) for syns in vocab for s in syns]
        self._warn_truncated(synonyms)  # also on a cache hit: the user should hear it every time
        path = self.text_cache_path(vocab)
        if path.is_file():
            try:
                emb = torch.load(path, map_location="cpu", weights_only=True)
                if isinstance(emb, Tensor) and emb.shape == (len(vocab), self.embed_dim):
                    self.cache_hits += 1
                    return emb
                raise ValueError(f"unexpected content {type(emb)}")
            except Exception as e:  # a broken cache must never stop training: recompute it
                warnings.warn(f"ignoring corrupt text-embedding cache {path}: {e}")
        self.cache_misses += 1
        emb = self._encode_vocab(vocab)
        if not self.write_cache:
            return emb
        try:
            atomic_save(emb, path)
        except OSError as e:  # a cache is an optimisation: an unwritable folder costs time, not the run
            warnings.warn(f"could not write the text-embedding cache {path} ({e}); set $VILD_CACHE to a writable "
                          f"folder to keep embeddings between runs")
        return emb

    def _encode_vocab(self, vocab: list[list[str]]) -> Tensor:
        prompts, prompt_synonym, synonym_category = prompt_plan(vocab, self.templates)
        # Sums of unit vectors point along their mean, so summing per synonym is enough.
        per_syn = torch.zeros(len(synonym_category), self.embed_dim)
        # on the CPU the text tower runs on torch's intra-op threads: every core unless torch.set_num_threads or
        # OMP_NUM_THREADS (which torchrun sets to 1 per process) says otherwise; the bar says how many
        where = f"{torch.get_num_threads()} CPU threads" if self.device.type == "cpu" else str(self.device)
        desc = f"embedding {len(vocab)} names x {len(self.templates)} templates on {where}"
        # shown only past PROGRESS_DELAY_S (a cold LVIS vocabulary takes minutes on a CPU); TQDM_DISABLE=1 hides it
        with tqdm(total=len(prompts), desc=desc, unit="prompt", delay=self.PROGRESS_DELAY_S, file=sys.stderr) as bar:
            for b in range(0, len(prompts), self.batch_size):
                texts, idx = prompts[b:b + self.batch_size], prompt_synonym[b:b + self.batch_size]
                with self.autocast():
                    e = encode_prompts(self.model, self.tokenizer(texts), self.device, self._truncate_prompts)
                per_syn.index_add_(0, torch.tensor(idx), F.normalize(e.float(), dim=-1).cpu())
                bar.update(len(idx))
        per_syn = F.normalize(per_syn, dim=-1)
        per_cat = torch.zeros(len(vocab), self.embed_dim).index_add_(0, torch.tensor(synonym_category), per_syn)
        return F.normalize(per_cat, dim=-1)

    def _warn_truncated(self, synonyms: list[str]) -> None:
        encode = getattr(self.tokenizer, "encode", None)
        ctx = getattr(self.tokenizer, "context_length", None) or getattr(self.model, "context_length", 77)
        if encode is None:
            return
        longest = max(self.templates, key=len)
        # +2 for the start/end tokens the tokenizer adds.
        cut = [s for s in synonyms if len(encode(fill_template(longest, s))) + 2 > ctx]
        if cut:
            warnings.warn(f"{len(cut)} name(s) truncated to the text encoder's {ctx}-token context "
                          f"in some prompts: {cut[:10]}")

    # ---- regions -------------------------------------------------------------------------
    @torch.no_grad()
    def embed_crops(self, crops: Tensor) -> Tensor:
        """[B, D] L2-normalised image embeddings of crops [B, 3, S, S] with values 0..1 (on the CPU)."""
        crops = crops.to(self.device, torch.float32)
        if tuple(crops.shape[-2:]) != self.image_size:
            crops = F.interpolate(crops, size=self.image_size, mode="bilinear", align_corners=False,
                                  antialias=True)
        return self._encode(crops, normalized=False).cpu()

    def _encode(self, x: Tensor, normalized: bool) -> Tensor:
        """Unit embeddings of [B, 3, S, S] crops, batch_size at a time; ``normalized``: already (x - mean) / std."""
        out = []
        for b in range(0, len(x), self.batch_size):
            xb = x[b:b + self.batch_size]
            xb = xb if normalized else (xb - self.mean) / self.std
            with self.autocast():
                out.append(F.normalize(self.model.encode_image(xb).float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim, device=self.device)

    def region_crops(self, images: Sequence[Tensor],
                     boxes_list: Sequence[Tensor]) -> Iterator[tuple[int, int, Tensor]]:
        """(image index, first box index, crops [b, 3, S, S] on 0..1) for every crop scale, in chunks of batch_size."""
        return self._region_chunks(images, boxes_list, normalize=False)

    @torch.no_grad()
    def _region_chunks(self, images: Sequence[Tensor], boxes_list: Sequence[Tensor],
                       normalize: bool) -> Iterator[tuple[int, int, Tensor]]:
        if len(images) != len(boxes_list):
            raise ValueError(f"{len(images)} images but {len(boxes_list)} box tensors")
        for i, (image, boxes) in enumerate(zip(images, self._boxes_on_device(boxes_list))):
            img = image.to(self.device, non_blocking=True).to(torch.float32).unsqueeze(0) / 255.0
            if normalize:
                # a per-pixel affine map commutes with roi_align's bilinear averaging (clipped boxes sample
                # only inside the image, where the weights sum to one): normalising the image once
                # replaces a pass over every crop, which outweighs the image many times over
                img = (img - self.mean) / self.std
            for s in self.crop_scales:
                scaled = _scale_boxes(boxes, s, img.shape[-2], img.shape[-1])
                for b in range(0, len(scaled), self.batch_size):
                    yield i, b, roi_align(img, [scaled[b:b + self.batch_size]], self.image_size, spatial_scale=1.0,
                                          sampling_ratio=-1, aligned=True)

    def _boxes_on_device(self, boxes_list: Sequence[Tensor]) -> list[Tensor]:
        boxes = [b.reshape(-1, 4).to(torch.float32) for b in boxes_list]
        if self.device.type == "cuda" and boxes and all(b.device.type == "cpu" for b in boxes):
            # one copy from pinned memory, which does not wait for the GPU (a copy from pageable memory per
            # image would drain the GPU's queue each time)
            flat = torch.cat(boxes).pin_memory().to(self.device, non_blocking=True)
            return list(flat.split([len(b) for b in boxes]))
        return [b.to(self.device) for b in boxes]

    @torch.no_grad()
    def embed_regions(self, images: Sequence[Tensor], boxes_list: Sequence[Tensor]) -> list[Tensor]:
        """Per image, [n_i, D] L2-normalised CLIP embeddings of its xyxy boxes (crop scales averaged)."""
        # sums stay on the device and come back in one copy at the end: a host copy per encoder batch
        # would make the CPU wait for the GPU each time instead of preparing the next crops
        sums = [torch.zeros(len(b), self.embed_dim, device=self.device) for b in boxes_list]
        # crops of all images and scales are cut into full encoder batches: flushing whatever had piled
        # up (e.g. 256 + 44 crops for 300 boxes) ran every other batch far below the GPU's efficient size
        pending: list[Tensor] = []
        owners: list[tuple[int, int, int]] = []  # (image, first box, count) of each pending row block

        def flush(final: bool) -> None:
            crops = torch.cat(pending) if len(pending) > 1 else pending[0]
            n = len(crops) if final else len(crops) // self.batch_size * self.batch_size
            emb = self._encode(crops[:n], normalized=True)
            rest = list(owners)
            pending.clear()
            owners.clear()
            done = 0
            for i, lo, count in rest:
                take = min(count, n - done)  # the block's rows that were in this flush
                if take:
                    sums[i][lo:lo + take] += emb[done:done + take]
                    done += take
                if take < count:
                    owners.append((i, lo + take, count - take))
            if n < len(crops):
                pending.append(crops[n:])

        for i, lo, crops in self._region_chunks(images, boxes_list, normalize=True):
            pending.append(crops)
            owners.append((i, lo, len(crops)))
            if sum(len(c) for c in pending) >= self.batch_size:
                flush(final=False)
        if pending:
            flush(final=True)
        if not sums:
            return []
        out = F.normalize(torch.cat(sums), dim=-1).cpu()
        return list(out.split([len(b) for b in sums]))

    def save_weights(self, path: Union[str, os.PathLike]) -> None:
        """Write the state dict so ``open_clip.create_model(name, pretrained=path)`` loads it back."""
        atomic_save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, path)


def _scale_boxes(boxes: Tensor, scale: float, height: int, width: int) -> Tensor:
    """Enlarge xyxy boxes about their centres by ``scale``, clipped to the image."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (scale / 2)
    out = torch.cat([centre - half, centre + half], dim=1).clamp_(min=0)
    # limits as Python numbers: a tensor of them would be a host-to-device copy that waits for the GPU
    out[:, 0::2] = out[:, 0::2].clamp(max=width)
    out[:, 1::2] = out[:, 1::2].clamp(max=height)
    return out
