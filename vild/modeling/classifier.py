"""Open-vocabulary classification: cosine similarity with text embeddings plus a learned background."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class ClassifierVocabulary(NamedTuple):
    """The categories a ``TextClassifier`` scores, as it uses them (``TextClassifier.make_vocabulary`` builds one).

    ``text_embeddings`` [K, D] L2-normalised float32; ``base_mask`` bool [K] (True: seen in training);
    ``reference_embeddings`` [Kr, D]: hidden categories that compete in the softmax, never output.
    """

    text_embeddings: torch.Tensor
    base_mask: torch.Tensor
    reference_embeddings: torch.Tensor


class TextClassifier(nn.Module):
    """Logits = [bg, text embeddings] · region embedding / τ.

    The vocabulary is either installed (``set_vocabulary``: non-persistent buffers) or passed per call
    (``forward(..., vocabulary=...)``), which leaves the installed one as it is.
    """

    def __init__(self, embed_dim: int, temperature: float = 0.01):
        super().__init__()
        self.embed_dim = embed_dim
        self.temperature = temperature
        self.background = nn.Parameter(torch.randn(embed_dim) * embed_dim ** -0.5)
        # not persistent: a checkpoint's weights must not pin a vocabulary
        self.register_buffer("text_embeddings", torch.zeros(0, embed_dim), persistent=False)
        self.register_buffer("base_mask", torch.zeros(0, dtype=torch.bool), persistent=False)
        # hidden categories: they compete in the softmax and are dropped from the scores (see set_vocabulary)
        self.register_buffer("reference_embeddings", torch.zeros(0, embed_dim), persistent=False)

    @property
    def num_classes(self) -> int:
        """Size of the current vocabulary (background excluded)."""
        return self.text_embeddings.shape[0]

    @property
    def installed_vocabulary(self) -> ClassifierVocabulary:
        """The vocabulary ``set_vocabulary`` installed (the buffers themselves, not copies)."""
        return ClassifierVocabulary(self.text_embeddings, self.base_mask, self.reference_embeddings)

    def make_vocabulary(self, text_embeddings: torch.Tensor, base_mask: torch.Tensor | None = None,
                        reference: torch.Tensor | None = None) -> ClassifierVocabulary:
        """A checked, normalised vocabulary on this classifier's device; ``base_mask`` marks categories seen in
        training (None: all novel).

        ``reference`` [Kr, D]: hidden categories (the training names, say) that compete for each region in
        the softmax but never appear in the output, so that a region showing one of them is not forced
        onto the nearest visible name. Logits then have 1 + K + Kr columns.
        """
        self._check_shape(text_embeddings, "text embeddings")
        if text_embeddings.shape[0] == 0:
            raise ValueError("vocabulary is empty: pass at least one category name")
        if reference is None:
            reference = text_embeddings.new_zeros((0, self.embed_dim))
        self._check_shape(reference, "reference embeddings")
        k = text_embeddings.shape[0]
        if base_mask is None:
            base_mask = torch.zeros(k, dtype=torch.bool)
        base_mask = torch.as_tensor(base_mask, dtype=torch.bool)
        if base_mask.shape != (k,):
            raise ValueError(f"base_mask has shape {tuple(base_mask.shape)}; expected ({k},)")
        device = self.background.device
        return ClassifierVocabulary(F.normalize(text_embeddings.detach().float(), dim=-1).to(device),
                                    base_mask.to(device),
                                    F.normalize(reference.detach().float(), dim=-1).to(device))

    def set_vocabulary(self, text_embeddings: torch.Tensor, base_mask: torch.Tensor | None = None,
                       reference: torch.Tensor | None = None) -> None:
        """Install the vocabulary that calls without one of their own use (arguments as ``make_vocabulary``'s)."""
        vocab = self.make_vocabulary(text_embeddings, base_mask, reference)
        self.text_embeddings, self.base_mask, self.reference_embeddings = vocab

    def vocabulary_for(self, vocabulary: ClassifierVocabulary | None) -> ClassifierVocabulary:
        """``vocabulary`` if given, else the installed one (which must be set)."""
        if vocabulary is not None:
            return vocabulary
        if self.num_classes == 0:
            raise RuntimeError("no vocabulary set: call set_vocabulary(text_embeddings) first")
        return self.installed_vocabulary

    def _check_shape(self, emb: torch.Tensor, what: str) -> None:
        if emb.dim() != 2 or emb.shape[1] != self.embed_dim:
            raise ValueError(
                f"{what} of shape {tuple(emb.shape)} do not fit this model: it expects "
                f"[K, {self.embed_dim}] (MODEL.VILD.EMBED_DIM must equal the CLIP teacher's embedding size)")

    def forward(self, region_embeddings: torch.Tensor, with_background: bool = True,
                shift: torch.Tensor | None = None, vocabulary: ClassifierVocabulary | None = None) -> torch.Tensor:
        """Return logits [R, 1 + K + Kr] (background first, hidden reference categories last) or [R, K + Kr].

        ``vocabulary``: the categories of this call (default: the installed ones).
        ``shift`` [D] (s): category logits use (x − s)·t / τ, the background's stays x·b / τ. With s a
        share of the mean embedding of typical regions, this is centering against hubs: some names'
        text embeddings sit near most region embeddings whatever they show (a cosine to a typical
        region well above the other names'), and subtracting the part of every score that a typical
        region gets (s·t) takes that head start away, and lowers all names against the background by
        what a typical region scores for them.
        """
        vocab = self.vocabulary_for(vocabulary)
        # fp32 even under autocast: ×100 logits in bf16 come in steps of 0.25, enough to reorder near-tied classes
        with torch.autocast(region_embeddings.device.type, enabled=False):
            weights = vocab.text_embeddings
            if len(vocab.reference_embeddings):
                weights = torch.cat([weights, vocab.reference_embeddings], dim=0)
            x = region_embeddings.float()
            logits = (x - shift.float()) @ weights.t() if shift is not None else x @ weights.t()
            if with_background:
                bg = x @ F.normalize(self.background.float(), dim=0)[:, None]
                logits = torch.cat([bg, logits], dim=1)
            return logits / self.temperature


def with_hidden_shown(vocab: ClassifierVocabulary) -> ClassifierVocabulary:
    """``vocab`` with its hidden reference categories as ordinary columns after its K own, counted as base.

    Scoring a region over this vocabulary gives the same softmax as over ``vocab`` (the same logits compete),
    with the hidden categories' scores kept, so that they can win a region's label: a caller then drops the
    detections labelled K or more. The concatenation runs even for Kr = 0, so a traced graph keeps Kr an input.
    """
    ref = vocab.reference_embeddings
    return ClassifierVocabulary(torch.cat([vocab.text_embeddings, ref], dim=0),
                                torch.cat([vocab.base_mask, torch.ones_like(ref[:, 0], dtype=torch.bool)]),
                                ref[:0])


def ensemble_scores(p_text: torch.Tensor, p_image: torch.Tensor, base_mask: torch.Tensor, lam: float) -> torch.Tensor:
    """ViLD-ensemble: base p_T^λ·p_I^(1−λ), novel p_T^(1−λ)·p_I^λ (geometric, per category)."""
    w_text = torch.where(base_mask, torch.full_like(base_mask, lam, dtype=p_text.dtype), 1.0 - lam)
    return p_text.clamp_min(1e-12) ** w_text * p_image.clamp_min(1e-12) ** (1.0 - w_text)
