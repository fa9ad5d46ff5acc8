"""The CLIP teacher: prompt templates, vocabularies, cached text and region embeddings."""
from .clip_teacher import CLIPTeacher
from .templates import get_templates
from .vocabulary import clean_name, load_vocabulary_file, parse_vocabulary

__all__ = ["CLIPTeacher", "get_templates", "parse_vocabulary", "load_vocabulary_file", "clean_name"]
