"""``vild-embed``: text embeddings of category names for a vild model (0 = done, 2 = setup error)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

# Only the standard library at import time: vild-embed --text-model runs without torch.


def main(argv: Optional[list[str]] = None) -> int:
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
        from ..deploy.text import VocabEmbeddings, save_vocab
        from ..teacher.vocabulary import load_vocabulary_file, parse_vocabulary
        vocab = parse_vocabulary(a.vocab) if a.vocab is not None else load_vocabulary_file(a.vocab_file)
        if a.text_model:
            from ..deploy.text import OnnxTextEncoder
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


if __name__ == "__main__":
    sys.exit(main())
