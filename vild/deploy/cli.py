"""``vild-export`` and ``vild-embed``: the command lines of ``vild.deploy`` (0 = done, 2 = setup error)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

# Only the standard library at import time: vild-embed --text-model runs without torch.


def export_main(argv: Optional[list[str]] = None) -> int:
    """``vild-export --weights model.pth --out model.onnx``: the detector and its text tower as ONNX files."""
    p = argparse.ArgumentParser(description="Export a vild checkpoint to ONNX: the detector (any vocabulary, given "
                                            "as text embeddings at run time) and the teacher's text tower.")
    p.add_argument("--weights", required=True, help="a vild checkpoint (training or exported)")
    p.add_argument("--out", required=True, help="the detector file, e.g. model.onnx")
    p.add_argument("--text-out", help="the text tower file (default: beside --out, model.text.onnx)")
    p.add_argument("--no-text", action="store_true", help="skip the text tower (embed names with vild-embed instead)")
    a = p.parse_args(argv)
    try:
        from .export import export_checkpoint
        written = export_checkpoint(a.weights, a.out, a.text_out, with_text=not a.no_text)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in written:
        print(f"wrote {f} ({f.stat().st_size / 2 ** 20:.1f} MiB)")
    return 0


def embed_main(argv: Optional[list[str]] = None) -> int:
    """``vild-embed --weights model.pth --vocab "kite,unicycle" --out vocab.npz``: text embeddings with their names."""
    p = argparse.ArgumentParser(description="Embed category names for a vild model; writes vocab.npz "
                                            "(embeddings, names, teacher identity).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="a vild checkpoint: its CLIP teacher embeds the names (PyTorch)")
    src.add_argument("--text-model", help="an exported text tower (model.text.onnx): onnxruntime, no torch")
    v = p.add_mutually_exclusive_group(required=True)
    v.add_argument("--vocab", help='categories: "kite,unicycle", synonyms with "|": "couch|sofa,tv"')
    v.add_argument("--vocab-file", help="one category per line (synonyms with |, # comments)")
    p.add_argument("--out", required=True, help="the .npz file to write")
    a = p.parse_args(argv)
    try:
        from ..teacher.vocabulary import load_vocabulary_file, parse_vocabulary
        from .text import VocabEmbeddings, save_vocab
        vocab = parse_vocabulary(a.vocab) if a.vocab is not None else load_vocabulary_file(a.vocab_file)
        if a.text_model:
            from .text import OnnxTextEncoder
            enc = OnnxTextEncoder(a.text_model)
            out = VocabEmbeddings(vocab, enc.encode(vocab), enc.identity)
        else:
            from ..api import Detector
            det = Detector.from_checkpoint(a.weights, device="cpu", vocabulary=vocab)
            out = VocabEmbeddings(det.vocabulary, det.teacher.encode_text(det.vocabulary).numpy(), det.teacher.identity)
        path = save_vocab(a.out, out)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {len(out.names)} categories, {out.embeddings.shape[1]}-d")
    return 0
