"""The synthetic open-vocabulary world (shape scenes) and the tiny CLIP teacher's pretraining."""
from vild.synthetic.shapes import CATEGORY_NAMES, NOVEL_NAMES
from vild.synthetic.world import generate_world, render_scene

__all__ = ["CATEGORY_NAMES", "NOVEL_NAMES", "generate_world", "render_scene"]
