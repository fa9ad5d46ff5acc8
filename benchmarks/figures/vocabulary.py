"""Figure 5, vocabulary: embedding 1203 names with the template ensemble (cold, cached) and swapping a vocabulary."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from common import LVIS_CLASSES, log, lvis_like_names, median, random_text_embeddings, timed

from .context import Context


def vocabulary(ctx: Context) -> dict:
    """Embedding 1203 names with the 'vild' template ensemble (cold, cached) and swapping a detector's vocabulary."""
    from vild.teacher.clip_teacher import atomic_save
    from vild.teacher.vocabulary import parse_vocabulary
    a, dev = ctx.args, ctx.device
    teacher = ctx.teacher()
    names = lvis_like_names(LVIS_CLASSES)
    k = min(a.vocab_names, LVIS_CLASSES)
    subset = names[:k]
    n_templates = len(teacher.templates)
    teacher.forget_identity()  # time the weights' fingerprint too, as a fresh teacher computes it
    _, t_identity = timed(lambda: teacher.identity, dev)
    teacher.cache_dir = ctx.scratch_dir("cold")
    misses = teacher.cache_misses
    emb, t_cold = timed(lambda: teacher.encode_text(subset), dev)
    assert teacher.cache_misses == misses + 1, "the cold call must miss the cache"
    hits = teacher.cache_hits
    cached = [timed(lambda: teacher.encode_text(subset), dev)[1] for _ in range(5)]
    assert teacher.cache_hits == hits + 5, "the cached calls must hit the cache"
    full_cached = cached
    seeded = False
    if k < LVIS_CLASSES:
        # the cached path for all 1203 names: seed the cache file (cold 1203 is too slow here), then load it
        vocab = parse_vocabulary(names, dedupe=False)
        atomic_save(F.normalize(torch.randn(LVIS_CLASSES, teacher.embed_dim), dim=-1), teacher.text_cache_path(vocab))
        seeded = True
        full_cached = [timed(lambda: teacher.encode_text(names), dev)[1] for _ in range(5)]
    # every synonym of a name is embedded with every template: count prompts, and scale by them
    synonyms, synonyms_1203 = (sum(len(s) for s in parse_vocabulary(n, dedupe=False)) for n in (subset, names))
    prompts = synonyms * n_templates
    cold_1203 = t_cold * synonyms_1203 / synonyms
    log(f"vocabulary: cold {k} names ({synonyms} synonyms) x {n_templates} templates {t_cold:.2f}s "
        f"({prompts / t_cold:.1f} prompts/s; 1203 names ~{cold_1203:.1f}s), cached 1203 "
        f"{median(full_cached) * 1000:.1f} ms")

    model = ctx.vild()
    vocabs = [random_text_embeddings(LVIS_CLASSES, model.embed_dim, seed=s) for s in (1, 2)]
    if emb.shape[1] == model.embed_dim and not seeded:
        vocabs[0] = emb
    swaps = [timed(lambda v=vocabs[i % 2]: model.set_vocabulary(v), dev)[1] for i in range(a.swap_repeats)]
    model.set_vocabulary(random_text_embeddings(LVIS_CLASSES, model.embed_dim))  # back to the inference vocabulary
    log(f"vocabulary swap (set_vocabulary, 1203 x {model.embed_dim}): {median(swaps) * 1000:.2f} ms")
    return {
        "clip_model": a.clip_model, "templates": "vild", "num_templates": n_templates,
        "teacher_identity_seconds": round(t_identity, 3),
        "cold": {"names": k, "synonyms": synonyms, "prompts": prompts, "seconds": round(t_cold, 3),
                 "prompts_per_s": round(prompts / t_cold, 2), "synonyms_1203_names": synonyms_1203,
                 "seconds_1203_names": round(cold_1203, 2), "extrapolated": k < LVIS_CLASSES},
        "cached": {"names": k, "seconds_median": round(median(cached), 5)},
        "cached_1203": {"names": LVIS_CLASSES, "seconds_median": round(median(full_cached), 5),
                        "seeded_cache_file": seeded},
        "set_vocabulary": {"classes": LVIS_CLASSES, "seconds_median": round(median(swaps), 6),
                           "device": str(dev)},
        "note": (f"cold timed on {k} of 1203 names and scaled by synonyms, i.e. prompts (batched, so cost is "
                 "linear); "
                 "the 1203-name cached figure loads a cache file of the right shape" if k < LVIS_CLASSES else ""),
    }
