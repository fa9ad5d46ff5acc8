"""Open-vocabulary classification: cosine similarity with text embeddings plus a learned background."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TextClassifier(nn.Module):
    """Logits = [bg, text embeddings] · region embedding / τ; the text matrix is a swappable buffer."""

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

    def set_vocabulary(self, text_embeddings: torch.Tensor, base_mask: torch.Tensor | None = None,
                       reference: torch.Tensor | None = None) -> None:
        """Replace the vocabulary; ``base_mask`` marks categories seen in training (None: all novel).

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
        self.text_embeddings = F.normalize(text_embeddings.detach().float(), dim=-1).to(device)
        self.base_mask = base_mask.to(device)
        self.reference_embeddings = F.normalize(reference.detach().float(), dim=-1).to(device)

    def _check_shape(self, emb: torch.Tensor, what: str) -> None:
        if emb.dim() != 2 or emb.shape[1] != self.embed_dim:
            raise ValueError(
                f"{what} of shape {tuple(emb.shape)} do not fit this model: it expects "
                f"[K, {self.embed_dim}] (MODEL.VILD.EMBED_DIM must equal the CLIP teacher's embedding size)")

    def forward(self, region_embeddings: torch.Tensor, with_background: bool = True,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        """Return logits [R, 1 + K + Kr] (background first, hidden reference categories last) or [R, K + Kr].

        ``shift`` [D] (s): category logits use (x − s)·t / τ, the background's stays x·b / τ. With s a
        share of the mean embedding of typical regions, this is centering against hubs: some names'
        text embeddings sit near most region embeddings whatever they show (a cosine to a typical
        region well above the other names'), and subtracting the part of every score that a typical
        region gets (s·t) takes that head start away, and lowers all names against the background by
        what a typical region scores for them.
        """
        if self.num_classes == 0:
            raise RuntimeError("no vocabulary set: call set_vocabulary(text_embeddings) first")
        # fp32 even under autocast: ×100 logits in bf16 come in steps of 0.25, enough to reorder near-tied classes
        with torch.autocast(region_embeddings.device.type, enabled=False):
            weights = self.text_embeddings
            if len(self.reference_embeddings):
                weights = torch.cat([weights, self.reference_embeddings], dim=0)
            x = region_embeddings.float()
            logits = (x - shift.float()) @ weights.t() if shift is not None else x @ weights.t()
            if with_background:
                bg = x @ F.normalize(self.background.float(), dim=0)[:, None]
                logits = torch.cat([bg, logits], dim=1)
            return logits / self.temperature


def ensemble_scores(p_text: torch.Tensor, p_image: torch.Tensor, base_mask: torch.Tensor, lam: float) -> torch.Tensor:
    """ViLD-ensemble: base p_T^λ·p_I^(1−λ), novel p_T^(1−λ)·p_I^λ (geometric, per category)."""
    w_text = torch.where(base_mask, torch.full_like(base_mask, lam, dtype=p_text.dtype), 1.0 - lam)
    return p_text.clamp_min(1e-12) ** w_text * p_image.clamp_min(1e-12) ** (1.0 - w_text)
