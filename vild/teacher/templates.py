"""Prompt-template sets that turn a category name into sentences for CLIP's text encoder.

A template holds ``{}`` for the name and may hold ``{article}``, which becomes "a" or "an"
to suit the name (the ViLD release writes its templates that way). Use `fill_template`.
"""
from __future__ import annotations

from typing import Callable, Union

from .vocabulary import clean_name

# The ViLD release's prompt ensemble (63 templates).
VILD_TEMPLATES = [
    "There is {article} {} in the scene.",
    "There is the {} in the scene.",
    "a photo of {article} {} in the scene.",
    "a photo of the {} in the scene.",
    "a photo of one {} in the scene.",
    "itap of {article} {}.",
    "itap of my {}.",
    "itap of the {}.",
    "a photo of {article} {}.",
    "a photo of my {}.",
    "a photo of the {}.",
    "a photo of one {}.",
    "a photo of many {}.",
    "a good photo of {article} {}.",
    "a good photo of the {}.",
    "a bad photo of {article} {}.",
    "a bad photo of the {}.",
    "a photo of a nice {}.",
    "a photo of the nice {}.",
    "a photo of a cool {}.",
    "a photo of the cool {}.",
    "a photo of a weird {}.",
    "a photo of the weird {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of a clean {}.",
    "a photo of the clean {}.",
    "a photo of a dirty {}.",
    "a photo of the dirty {}.",
    "a bright photo of {article} {}.",
    "a bright photo of the {}.",
    "a dark photo of {article} {}.",
    "a dark photo of the {}.",
    "a photo of a hard to see {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of {article} {}.",
    "a low resolution photo of the {}.",
    "a cropped photo of {article} {}.",
    "a cropped photo of the {}.",
    "a close-up photo of {article} {}.",
    "a close-up photo of the {}.",
    "a jpeg corrupted photo of {article} {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of {article} {}.",
    "a blurry photo of the {}.",
    "a pixelated photo of {article} {}.",
    "a pixelated photo of the {}.",
    "a black and white photo of the {}.",
    "a black and white photo of {article} {}.",
    "a plastic {}.",
    "the plastic {}.",
    "a toy {}.",
    "the toy {}.",
    "a plushie {}.",
    "the plushie {}.",
    "a cartoon {}.",
    "the cartoon {}.",
    "an embroidered {}.",
    "the embroidered {}.",
    "a painting of the {}.",
    "a painting of a {}.",
]


def _clip_templates() -> list[str]:
    """CLIP's 80 ImageNet templates, taken from open_clip so they stay the reference list."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES  # open_clip imports torch: only when asked

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


TEMPLATE_SETS: dict[str, Union[list[str], Callable[[], list[str]]]] = {
    "vild": VILD_TEMPLATES,
    "clip": _clip_templates,
    "simple": ["a photo of a {}."],
    "none": ["{}"],
}


def get_templates(name: str) -> list[str]:
    """Return a copy of the named template set (vild | clip | simple | none)."""
    key = name.strip().lower()
    if key not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {name!r}; valid names: {', '.join(TEMPLATE_SETS)}")
    templates = TEMPLATE_SETS[key]
    return list(templates() if callable(templates) else templates)


def fill_template(template: str, name: str) -> str:
    """Put ``name`` into ``template``, resolving ``{article}`` to "a" or "an"."""
    article = "an" if name[:1].lower() in "aeiou" and name else "a"
    return template.replace("{article}", article).replace("{}", name)


def prompt_plan(vocab: list[list[str]], templates: list[str]) -> tuple[list[str], list[int], list[int]]:
    """The prompts that embed a vocabulary (every template filled with every cleaned synonym), each prompt's
    synonym index and each synonym's category index: the embedding of a category is the normalised sum of its
    synonyms', and a synonym's the normalised sum of its prompts'."""
    synonyms = [clean_name(s) for syns in vocab for s in syns]
    prompts = [fill_template(t, s) for s in synonyms for t in templates]
    prompt_synonym = [i for i in range(len(synonyms)) for _ in templates]
    synonym_category = [k for k, syns in enumerate(vocab) for _ in syns]
    return prompts, prompt_synonym, synonym_category
