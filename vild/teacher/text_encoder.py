"""CLIP's text tower on prompts cut to their length: the same embeddings for a fraction of the work.

Prompts like "a photo of a kite." are 8 to 20 tokens, padded to CLIP's context of 77. In open_clip's
standard ``CLIP`` the text transformer is causal and the embedding is read at the end-of-text token
(the largest token id): no position before that token ever sees the padding after it, so cutting every
prompt of a batch after the batch's last end token leaves the embeddings unchanged while the
transformer runs on 4 to 10x fewer positions. On one CPU core (ViT-B/32, two names x 63 templates):
1.42 s instead of 9.18 s (benchmarks/README.md). Other towers (bidirectional, other pooling) run whole.
"""
from __future__ import annotations

import torch
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from torch import Tensor, nn


def can_truncate(model: nn.Module) -> bool:
    """Whether ``model``'s text tower is causal with end-token pooling (so padding can be cut)."""
    mask = getattr(model, "attn_mask", None)
    if type(model) is not CLIP or getattr(model, "text_pool_type", None) != "argmax" or mask is None:
        return False
    n = mask.shape[-1]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=mask.device), diagonal=1)
    # causal: every future position masked out, nothing else
    return bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())


def encode_prompts(model: nn.Module, tokens: Tensor, device: torch.device, truncate: bool) -> Tensor:
    """``model.encode_text(tokens.to(device))``, cut after the batch's last end-of-text token when ``truncate``."""
    if not truncate:
        return model.encode_text(tokens.to(device))
    length = int(tokens.argmax(dim=-1).max()) + 1  # on the tokenizer's (host) tensor: no device sync
    text = tokens[:, :length].to(device)
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is None:
        return x
    return model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
