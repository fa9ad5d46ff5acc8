"""The CLIP proposal store: per-image proposal boxes + fp16 CLIP embeddings, sharded and memory-mapped.

Layout under ``root``::

    meta.json                   embed_dim, max_proposals, num_shards, teacher identity, crop scales
    shard_00000/ids.json        the image ids this shard owns; slot = position in the list
    shard_00000/boxes.f32       [cap, M, 4] xyxy, original-image pixels
    shard_00000/embeds.f16      [cap, M, D]
    shard_00000/count.i32       [cap] number of proposals in the record
    shard_00000/valid.u8        [cap] commit flag, set only after the record's data is on disk

Image ``image_ids[i]`` (the full list every writer is given) belongs to shard ``i % num_shards``.
Each shard has exactly one writer, so no file is ever written by two processes, and the reader
derives the global index from the per-shard ``ids.json`` files (no finalize step).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

FORMAT_VERSION = 1
_FILES = {"boxes": ("boxes.f32", np.float32), "embeds": ("embeds.f16", np.float16),
          "count": ("count.i32", np.int32), "valid": ("valid.u8", np.uint8)}


def _shard_dir(root: Path, shard_index: int) -> Path:
    return root / f"shard_{shard_index:05d}"


def _ids_digest(image_ids: list[int]) -> str:
    return hashlib.sha256(json.dumps([int(i) for i in image_ids]).encode()).hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    # not vild.utils.atomic: this module stays free of package imports and torch, so writer processes start fast
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _record_shapes(cap: int, m: int, d: int) -> dict[str, tuple[int, ...]]:
    return {"boxes": (cap, m, 4), "embeds": (cap, m, d), "count": (cap,), "valid": (cap,)}


class ProposalStoreWriter:
    """Writes one shard of a proposal store; resumable (``pending()``) and crash-safe per record."""

    def __init__(self, root: str | os.PathLike, shard_index: int, num_shards: int, image_ids: Iterable[int],
                 max_proposals: int, embed_dim: int, teacher: dict | None = None,
                 crop_scales: Iterable[float] | None = None, durable: bool = True):
        """Open (creating if needed) shard ``shard_index`` of ``num_shards`` for ``image_ids`` (the full list)."""
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} outside 0..{num_shards - 1}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        all_ids = [int(i) for i in image_ids]
        if len(set(all_ids)) != len(all_ids):
            raise ValueError("image_ids contains duplicates")
        self.max_proposals, self.embed_dim, self.durable = int(max_proposals), int(embed_dim), durable
        self._ensure_meta({
            "format_version": FORMAT_VERSION, "embed_dim": self.embed_dim, "max_proposals": self.max_proposals,
            "num_shards": int(num_shards), "num_images": len(all_ids), "image_ids_sha256": _ids_digest(all_ids),
            "teacher": teacher, "crop_scales": list(crop_scales) if crop_scales is not None else None,
        })
        self.shard_index = shard_index
        self.image_ids = all_ids[shard_index::num_shards]
        self._slot = {i: s for s, i in enumerate(self.image_ids)}
        self.dir = _shard_dir(self.root, shard_index)
        self._open_shard()

    def _ensure_meta(self, meta: dict) -> None:
        path = self.root / "meta.json"
        tmp = self.root / f".meta.json.{os.getpid()}.tmp"
        if not path.exists():
            _write_json_atomic(tmp, meta)
            try:
                os.link(tmp, path)  # atomic create-if-absent: concurrent writers cannot overwrite each other
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        with open(path) as f:
            have = json.load(f)
        keys = ["format_version", "embed_dim", "max_proposals", "num_shards", "image_ids_sha256"]
        if have.get("teacher") is not None and meta["teacher"] is not None:
            keys.append("teacher")
        bad = [k for k in keys if have.get(k) != meta[k]]
        if bad:
            raise ValueError(f"proposal store {self.root} was created with different settings ({', '.join(bad)}): "
                             f"have {[have.get(k) for k in bad]}, asked for {[meta[k] for k in bad]}; use a new folder")

    def _open_shard(self) -> None:
        ids_file = self.dir / "ids.json"
        cap = len(self.image_ids)
        shapes = _record_shapes(cap, self.max_proposals, self.embed_dim)
        if ids_file.exists():
            with open(ids_file) as f:
                if json.load(f)["image_ids"] != self.image_ids:
                    raise ValueError(f"{ids_file} lists other image ids than this writer was given")
        else:
            # files first, ids.json last: a shard without ids.json is ignored by readers and rebuilt here
            self.dir.mkdir(parents=True, exist_ok=True)
            for key, (name, dtype) in _FILES.items():
                with open(self.dir / name, "wb") as f:
                    f.truncate(int(np.prod(shapes[key])) * np.dtype(dtype).itemsize)  # sparse, zero-filled
            _write_json_atomic(ids_file, {"shard_index": self.shard_index, "image_ids": self.image_ids})
        self._fd = {k: os.open(self.dir / name, os.O_RDWR) for k, (name, _) in _FILES.items()}
        self._rec_bytes = {k: int(np.prod(shapes[k][1:])) * np.dtype(dt).itemsize for k, (_, dt) in _FILES.items()}

    def _pwrite(self, key: str, slot: int, data: bytes) -> None:
        os.pwrite(self._fd[key], data, slot * self._rec_bytes[key])

    def _sync(self, *keys: str) -> None:
        if self.durable:
            for k in keys:
                os.fdatasync(self._fd[k])

    def _write_record(self, slot: int, boxes: np.ndarray, embeds: np.ndarray) -> None:
        n = len(boxes)
        b = np.zeros((self.max_proposals, 4), np.float32)
        e = np.zeros((self.max_proposals, self.embed_dim), np.float16)
        b[:n], e[:n] = boxes, embeds
        self._pwrite("boxes", slot, b.tobytes())
        self._pwrite("embeds", slot, e.tobytes())
        self._pwrite("count", slot, np.int32(n).tobytes())

    def _set_flags(self, slots: list[int], flag: bool) -> None:
        for slot in slots:
            self._pwrite("valid", slot, b"\x01" if flag else b"\x00")
        if slots:
            self._sync("valid")

    def put(self, image_id: int, boxes: Any, embeds: Any) -> None:
        """Store ``boxes`` [n, 4] xyxy (original pixels) and ``embeds`` [n, D] for one image, n <= max_proposals."""
        self.put_many([(image_id, boxes, embeds)])

    def put_many(self, items: Iterable[tuple[int, Any, Any]]) -> None:
        """Store several (image_id, boxes, embeds) records and commit them together.

        Data of all records first, one sync, then their valid flags, one sync: a crash leaves each record
        either committed or pending, as with ``put``, at two syncs per batch instead of two per image.
        """
        records = []
        for image_id, boxes, embeds in items:
            slot = self._slot.get(int(image_id))
            if slot is None:
                raise KeyError(f"image {image_id} does not belong to shard {self.shard_index}")
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            embeds = np.asarray(embeds, dtype=np.float32).reshape(len(boxes), -1) if len(boxes) else \
                np.zeros((0, self.embed_dim), np.float32)
            if len(boxes) > self.max_proposals:
                raise ValueError(f"image {image_id}: {len(boxes)} proposals > max_proposals {self.max_proposals}")
            if embeds.shape[1] != self.embed_dim:
                raise ValueError(f"image {image_id}: embeddings of dim {embeds.shape[1]}, store expects "
                                 f"{self.embed_dim}")
            records.append((slot, boxes, embeds))
        if not records:
            return
        # an overwrite is uncommitted until its new data is down
        self._set_flags([slot for slot, _, _ in records if self._committed(slot)], False)
        for slot, boxes, embeds in records:
            self._write_record(slot, boxes, embeds)
        self._sync("boxes", "embeds", "count")
        self._set_flags([slot for slot, _, _ in records], True)

    def _committed(self, slot: int) -> bool:
        return os.pread(self._fd["valid"], 1, slot) == b"\x01"

    def pending(self) -> list[int]:
        """Image ids of this shard without a committed record (what a resumed run still has to do)."""
        flags = os.pread(self._fd["valid"], len(self.image_ids), 0)
        return [i for i, f in zip(self.image_ids, flags) if f != 1]

    def close(self) -> None:
        """Close the shard files."""
        for fd in getattr(self, "_fd", {}).values():
            os.close(fd)
        self._fd = {}

    def __enter__(self) -> "ProposalStoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ProposalStore:
    """Read-only view of a proposal store; O(1) memory-mapped access per image, cheap to open and pickle."""

    def __init__(self, root: str | os.PathLike, teacher: dict | None = None):
        """Open the store at ``root``; if ``teacher`` is given it must equal the identity the store was built with."""
        self.root = Path(root)
        meta_file = self.root / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"no proposal store at {self.root} (missing meta.json); build one first")
        with open(meta_file) as f:
            self.meta = json.load(f)
        if teacher is not None and self.meta.get("teacher") is not None and self.meta["teacher"] != teacher:
            raise ValueError(f"proposal store {self.root} was built with teacher {self.meta['teacher']}, "
                             f"but the current teacher is {teacher}: rebuild the store")
        self.embed_dim, self.max_proposals = int(self.meta["embed_dim"]), int(self.meta["max_proposals"])
        self._index: dict[int, tuple[int, int]] = {}
        self._shards: list[tuple[Path, int]] = []
        for d in sorted(self.root.glob("shard_*")):
            if not (d / "ids.json").is_file():
                continue  # a writer died before creating the shard: nothing in it is committed
            with open(d / "ids.json") as f:
                ids = json.load(f)["image_ids"]
            if not ids:
                continue  # more shards than images; an empty file cannot be memory-mapped
            k = len(self._shards)
            self._shards.append((d, len(ids)))
            self._index.update({int(i): (k, s) for s, i in enumerate(ids)})
        self._maps: dict[int, dict[str, np.ndarray]] = {}

    @property
    def teacher(self) -> dict | None:
        """Identity of the CLIP teacher that produced the embeddings."""
        return self.meta.get("teacher")

    def _map(self, k: int) -> dict[str, np.ndarray]:
        if k not in self._maps:
            d, cap = self._shards[k]
            shapes = _record_shapes(cap, self.max_proposals, self.embed_dim)
            self._maps[k] = {key: np.memmap(d / name, dtype=dt, mode="r", shape=shapes[key])
                             for key, (name, dt) in _FILES.items()}
        return self._maps[k]

    def get(self, image_id: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(boxes float32 [n, 4], embeds float16 [n, D])`` for a committed image, else None."""
        loc = self._index.get(int(image_id))
        if loc is None:
            return None
        m = self._map(loc[0])
        s = loc[1]
        if m["valid"][s] != 1:
            return None
        n = int(m["count"][s])
        return np.array(m["boxes"][s, :n]), np.array(m["embeds"][s, :n])

    def __contains__(self, image_id: object) -> bool:
        loc = self._index.get(int(image_id))  # type: ignore[arg-type]
        return loc is not None and self._map(loc[0])["valid"][loc[1]] == 1

    def __len__(self) -> int:
        return int(sum(int(self._map(k)["valid"].sum()) for k in range(len(self._shards))))

    def __getstate__(self) -> dict:
        # memmaps would pickle as full copies; data-loader workers reopen them lazily instead
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state
