"""The text side of a deployment without torch: the exported CLIP text tower on onnxruntime, and vocab.npz files.

``OnnxTextEncoder("model.text.onnx").encode("kite,unicycle")`` gives the [K, D] embeddings that
``CLIPTeacher.encode_text`` gives (same tokens, prompt templates and averaging); ``save_vocab`` /
``load_vocab`` keep embeddings with their names. Only numpy, onnxruntime, ftfy and regex are imported.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..teacher.templates import prompt_plan
from ..teacher.vocabulary import VocabLike, parse_vocabulary
from .tokenizer import BPETokenizer

TEXT_FORMAT = "vild-text-onnx-1"
VOCAB_FORMAT = "vild-vocab-1"


def open_graph(path: Union[str, os.PathLike], providers: Optional[Sequence[str]] = None, threads: int = 0):
    """An onnxruntime runtime of ``path``, with errors that say what to install or export."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError("onnxruntime is not installed: pip install 'vild[onnx]' (or onnxruntime)") from None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ONNX file {p} not found: write it with vild-export --weights model.pth --out {p}")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(str(p), opts, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
        raise ValueError(f"{p} is not a readable ONNX model ({str(e).splitlines()[0][:200]}): "
                         f"export it again with vild-export") from None


def graph_metadata(runtime: Any, path: Union[str, os.PathLike], fmt: str) -> dict[str, str]:
    """The vild metadata of an exported file; a clear error for a file of another kind."""
    meta = dict(runtime.get_modelmeta().custom_metadata_map)
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not a vild {fmt.split('-onnx')[0].replace('vild-', '')} export "
                         f"(format {meta.get('format')!r}, expected {fmt!r}): write it with vild-export")
    return meta


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class OnnxTextEncoder:
    """The teacher's text tower exported by ``vild-export`` (``model.text.onnx``): category names → embeddings.

    Args:
        path: the ``.text.onnx`` file; it holds the tokenizer's merges, the prompt templates and the teacher's
            identity as metadata.
        providers: onnxruntime execution providers (default: the CPU).
        batch_size: prompts per run of the tower.
    """

    def __init__(self, path: Union[str, os.PathLike], providers: Optional[Sequence[str]] = None,
                 batch_size: int = 256):
        self.path = Path(path)
        self.runtime = open_graph(self.path, providers)
        meta = graph_metadata(self.runtime, self.path, TEXT_FORMAT)
        self.templates: list[str] = json.loads(meta["templates"])
        self.identity: dict = json.loads(meta["teacher"])
        self.embed_dim = int(meta["embed_dim"])
        self.tokenizer = BPETokenizer(meta["bpe_merges"].split("\n"), int(meta["context_length"]))
        self.batch_size = int(batch_size)

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Unit embeddings [N, D] of token rows [N, context_length]."""
        return self.runtime.run(None, {"tokens": tokens.astype(np.int64)})[0]

    def encode(self, names: VocabLike) -> np.ndarray:
        """[K, D] float32 unit embeddings; entry k is a name, "a|b" or a synonym list (as in ``CLIPTeacher``)."""
        vocab = parse_vocabulary(names, dedupe=False) if not isinstance(names, str) else parse_vocabulary(names)
        if not isinstance(names, str) and len(vocab) != len(names):
            raise ValueError("every vocabulary entry needs a non-blank name (a blank would shift label indices)")
        prompts, prompt_synonym, synonym_category = prompt_plan(vocab, self.templates)
        per_syn = np.zeros((len(synonym_category), self.embed_dim), dtype=np.float64)
        for b in range(0, len(prompts), self.batch_size):
            emb = self.encode_tokens(self.tokenizer(prompts[b:b + self.batch_size]))
            np.add.at(per_syn, prompt_synonym[b:b + self.batch_size], emb)
        per_cat = np.zeros((len(vocab), self.embed_dim), dtype=np.float64)
        np.add.at(per_cat, synonym_category, l2_normalize(per_syn))
        return l2_normalize(per_cat).astype(np.float32)

    # the call a Detector makes of its teacher
    def encode_text(self, names: VocabLike) -> Any:
        """``encode`` as a torch tensor, for ``vild.deploy.OnnxDetector`` (the one use that needs torch)."""
        import torch
        return torch.from_numpy(self.encode(names))


@dataclass
class VocabEmbeddings:
    """A vocabulary with its text embeddings, as ``vild-embed`` writes it."""

    names: list[list[str]]  # categories, each a list of synonyms (the first is the display name)
    embeddings: np.ndarray  # float32 [K, D], unit rows, row k for names[k]
    teacher: dict  # identity of the text tower that embedded them


def save_vocab(path: Union[str, os.PathLike], vocab: VocabEmbeddings) -> Path:
    """Write a vocab.npz (atomically): ``embeddings`` [K, D], ``names`` and ``teacher`` as JSON strings."""
    from ..utils.atomic import atomic_write_bytes

    emb = np.asarray(vocab.embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(vocab.names):
        raise ValueError(f"{len(vocab.names)} names but embeddings of shape {emb.shape}: one row per name")
    buf = io.BytesIO()
    np.savez(buf, format=np.array(VOCAB_FORMAT), embeddings=emb, names=np.array(json.dumps(vocab.names)),
             teacher=np.array(json.dumps(vocab.teacher)))
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_vocab(path: Union[str, os.PathLike]) -> VocabEmbeddings:
    """Read a vocab.npz written by ``save_vocab`` / ``vild-embed`` (no pickles)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["format"]) != VOCAB_FORMAT:
                raise ValueError(f"format {str(f['format'])!r}")
            out = VocabEmbeddings(json.loads(str(f["names"])), np.asarray(f["embeddings"], dtype=np.float32),
                                  json.loads(str(f["teacher"])))
    except FileNotFoundError:
        raise FileNotFoundError(f"vocabulary file {path} not found: write it with vild-embed") from None
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a vild vocabulary file ({e}): write it with vild-embed") from None
    if out.embeddings.ndim != 2 or len(out.embeddings) != len(out.names):
        raise ValueError(f"{path}: {len(out.names)} names but embeddings of shape {out.embeddings.shape}")
    return out
