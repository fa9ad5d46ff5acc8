"""CLIP teacher: templates, vocabularies, text cache, region crops, weights round trip, errors."""
import hashlib
import time

import pytest
import torch
import torch.nn.functional as F

from vild.teacher import CLIPTeacher, get_templates, load_vocabulary_file, parse_vocabulary
from vild.teacher.templates import fill_template
from vild.teacher.vocabulary import clean_name

MICRO = "vild-test-micro"  # vild/teacher/model_configs/vild-test-micro.json, random weights


@pytest.fixture
def teacher(tmp_path):
    torch.manual_seed(0)
    return CLIPTeacher(MICRO, "", cache_dir=str(tmp_path / "cache"), templates="simple")


def _image(h=48, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def _unit(x):
    return torch.allclose(x.norm(dim=-1), torch.ones(len(x)), atol=1e-5)


# ---- templates and vocabularies ---------------------------------------------------------------
def test_template_sets():
    assert len(get_templates("vild")) == 63 and len(get_templates("clip")) == 80
    assert get_templates("simple") == ["a photo of a {}."] and get_templates("none") == ["{}"]
    assert fill_template("a photo of {article} {}.", "apple") == "a photo of an apple."
    assert fill_template("a photo of {article} {}.", "kite") == "a photo of a kite."
    with pytest.raises(ValueError, match="vild, clip, simple, none"):
        get_templates("fancy")


def test_parse_vocabulary_forms(tmp_path):
    expected = [["couch", "sofa"], ["tv", "television"]]
    assert parse_vocabulary(" couch | sofa , tv|television ") == expected
    assert parse_vocabulary(["couch|sofa", "tv|television"]) == expected
    assert parse_vocabulary([["couch", "sofa"], ["tv", "television"]]) == expected
    with pytest.warns(UserWarning, match="duplicate"):
        assert parse_vocabulary("cat,dog,cat") == [["cat"], ["dog"]]
    for empty in ["", " , ,", [], [" | "]]:
        with pytest.raises(ValueError, match='pass --vocab "cat,dog"'):
            parse_vocabulary(empty)
    f = tmp_path / "vocab.txt"
    f.write_text("# my classes\ncouch|sofa  # furniture\n\n tv | television\n")
    assert load_vocabulary_file(f) == expected
    f.write_bytes("\ufeffcouch|sofa\r\ntv|television\r\n".encode())  # a Windows editor's byte-order mark
    assert load_vocabulary_file(f) == expected


def test_clean_name():
    assert clean_name("bow_(weapon)") == "bow weapon"
    assert clean_name("tv_(television)") == "tv television"
    assert clean_name("traffic light") == "traffic light"


# ---- text embeddings ----------------------------------------------------------------------------
def test_text_embeddings_shape_and_norm(teacher):
    assert teacher.embed_dim == 32
    emb = teacher.encode_text(["cat", ["couch", "sofa"], "tv|television"])
    assert emb.shape == (3, 32) and emb.dtype == torch.float32 and _unit(emb)
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)


def test_synonyms_average(teacher):
    teacher.templates = get_templates("vild")  # many templates: per-synonym means differ in norm
    single = teacher.encode_text(["couch", "sofa"])
    both = teacher.encode_text([["couch", "sofa"]])[0]
    assert torch.allclose(both, F.normalize(single.sum(0), dim=0), atol=1e-5)
    assert torch.allclose(teacher.encode_text(["couch|sofa"])[0], both, atol=1e-6)
    assert not torch.allclose(both, single[0], atol=1e-3)


def test_empty_vocabulary_is_an_error(teacher):
    with pytest.raises(ValueError, match="vocabulary is empty"):
        teacher.encode_text([])
    with pytest.raises(ValueError, match="non-blank"):
        teacher.encode_text(["cat", " "])  # a dropped entry would shift label indices


def test_text_cache_hit_and_corruption(teacher):
    names = ["cat", "dog"]
    first = teacher.encode_text(names)
    assert (teacher.cache_hits, teacher.cache_misses) == (0, 1)
    path = teacher.text_cache_path(parse_vocabulary(names))
    assert path.is_file() and path.parent == teacher.cache_dir
    assert torch.equal(teacher.encode_text(names), first)
    assert (teacher.cache_hits, teacher.cache_misses) == (1, 1)

    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="corrupt"):
        again = teacher.encode_text(names)
    assert torch.allclose(again, first) and teacher.cache_misses == 2
    assert torch.equal(torch.load(path, weights_only=True), first)  # rewritten


def test_cache_key_depends_on_names_and_templates(teacher, tmp_path):
    vocab = [["cat"], ["dog"]]
    key = teacher.text_cache_path(vocab)
    assert teacher.text_cache_path([["cat"], ["wolf"]]) != key
    assert teacher.text_cache_path([["dog"], ["cat"]]) != key
    teacher.templates = get_templates("vild")
    assert teacher.text_cache_path(vocab) != key


def test_a_cold_encoding_shows_progress_with_its_thread_count(teacher, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(teacher, "cache_dir", tmp_path)
    monkeypatch.setattr(type(teacher), "PROGRESS_DELAY_S", 0.0)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    teacher.encode_text(["kite", "unicycle"])
    err = capsys.readouterr().err
    n = 2 * len(teacher.templates)
    assert f"embedding 2 names x {len(teacher.templates)} templates on {torch.get_num_threads()} CPU threads" in err
    assert f"{n}/{n}" in err and "prompt/s" in err
    teacher.encode_text(["kite", "unicycle"])
    assert "embedding" not in capsys.readouterr().err  # from the cache: nothing to show


def test_long_name_warns(teacher):
    with pytest.warns(UserWarning, match="truncated"):
        teacher.encode_text(["a very long name of an extremely complicated object thing"])


# ---- region embeddings ------------------------------------------------------------------------------
def test_region_embeddings(teacher):
    boxes = torch.tensor([[0, 0, 30, 30], [10, 5, 60, 40], [0, 0, 30, 30]], dtype=torch.float32)
    small = _image(20, 24, seed=1)
    out = teacher.embed_regions([_image(), small], [boxes, torch.tensor([[2.0, 2.0, 20.0, 18.0]])])
    assert [o.shape for o in out] == [(3, 32), (1, 32)] and all(_unit(o) for o in out)
    assert torch.equal(out[0][0], out[0][2])  # same box, same embedding
    assert not torch.allclose(out[0][0], out[0][1], atol=1e-3)
    repeat = teacher.embed_regions([_image(), small], [boxes, torch.tensor([[2.0, 2.0, 20.0, 18.0]])])
    assert all(torch.equal(a, b) for a, b in zip(repeat, out))  # the same call twice: bit-identical
    # crops of several images share encoder batches; another batch composition may move the last bits only
    again = teacher.embed_regions([_image()], [boxes])[0]
    assert torch.allclose(again, out[0], atol=1e-5)
    as_float = teacher.embed_regions([_image().float()], [boxes])[0]
    assert torch.allclose(as_float, out[0], atol=1e-6)
    assert teacher.embed_regions([_image()], [torch.zeros(0, 4)])[0].shape == (0, 32)


def test_region_crop_is_the_box_and_scales_average(teacher):
    img = _image(32, 32)  # the model's input size: a full-image box crops to the image itself
    full = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    direct = teacher.embed_crops(img[None].float() / 255)
    assert torch.allclose(teacher.embed_regions([img], [full])[0], direct, atol=1e-5)

    box = torch.tensor([[8.0, 8.0, 20.0, 24.0]])
    per_scale = []
    for s in (1.0, 1.5):
        teacher.crop_scales = (s,)
        per_scale.append(teacher.embed_regions([img], [box])[0])
    teacher.crop_scales = (1.0, 1.5)
    both = teacher.embed_regions([img], [box])[0]
    assert not torch.allclose(per_scale[0], per_scale[1], atol=1e-3)
    assert torch.allclose(both, F.normalize(per_scale[0] + per_scale[1], dim=-1), atol=1e-5)


# ---- weights, identity, config ----------------------------------------------------------------------
def test_save_weights_round_trip(teacher, tmp_path):
    path = tmp_path / "micro.pt"
    teacher.save_weights(path)
    loaded = CLIPTeacher(MICRO, str(path), cache_dir=str(tmp_path / "cache2"), templates="simple")
    names = ["cat", ["couch", "sofa"]]
    assert torch.equal(loaded.encode_text(names), teacher.encode_text(names))
    boxes = [torch.tensor([[1.0, 2.0, 40.0, 30.0]])]
    assert torch.equal(loaded.embed_regions([_image()], boxes)[0], teacher.embed_regions([_image()], boxes)[0])
    ident = loaded.identity
    assert ident == {"model": MICRO, "pretrained": str(path.resolve()),
                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "quick_gelu": False}
    assert teacher.identity["sha256"] != ident["sha256"]  # random init: fingerprint of the tensors


def test_identity_follows_weights_changed_in_place_once_forgotten(teacher):
    before = teacher.identity["sha256"]
    with torch.no_grad():
        next(teacher.model.parameters()).add_(1.0)
    assert teacher.identity["sha256"] == before  # remembered: hashing the weights at every call would be slow
    teacher.forget_identity()
    assert teacher.identity["sha256"] != before


def test_autocast_is_bf16_autocast_on_cuda(teacher):
    ctx = teacher.autocast()
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16


def test_frozen_and_eval(teacher):
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.model.training


def test_from_config(tmp_path):
    from vild.config import get_cfg
    cfg = get_cfg()
    cfg.TEACHER.MODEL, cfg.TEACHER.PRETRAINED = MICRO, ""
    cfg.TEACHER.TEMPLATES, cfg.TEACHER.CACHE_DIR = "none", str(tmp_path)
    cfg.TEACHER.CROP_SCALES, cfg.TEACHER.BATCH_SIZE = [1.0, 2.0], 7
    t = CLIPTeacher.from_config(cfg, "cpu")
    assert (t.templates, t.crop_scales, t.batch_size) == (["{}"], (1.0, 2.0), 7)
    assert str(t.cache_dir) == str(tmp_path)
    assert t.encode_text(["a", "b", "c", "d", "e", "f", "g", "h"]).shape == (8, 32)  # > one batch


# ---- errors ------------------------------------------------------------------------------------------
def test_unknown_model_name():
    with pytest.raises(ValueError, match="vild-test-micro"):
        CLIPTeacher("vild-test-micr", "")


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        CLIPTeacher(MICRO, str(tmp_path / "nope.pt"))


def test_unknown_tag():
    with pytest.raises(ValueError, match="TEACHER.PRETRAINED"):
        CLIPTeacher(MICRO, "laion400m_e32")


def test_openai_tags_get_quick_gelu_and_tags_match_any_case(monkeypatch):
    """open_clip builds ViT-B-32 with GELU; OpenAI's weights were trained with QuickGELU."""
    import open_clip

    from vild.teacher import clip_teacher
    calls = []
    monkeypatch.setattr(open_clip, "create_model", lambda name, **kw: calls.append((name, kw)))
    clip_teacher._create_model("ViT-B-32", "OpenAI", torch.device("cpu"))
    clip_teacher._create_model("ViT-B-32", "laion2b_s34b_b79k", torch.device("cpu"))
    assert [(kw["pretrained"], kw["force_quick_gelu"]) for _, kw in calls] == [
        ("openai", True), ("laion2b_s34b_b79k", False)]


def test_unwritable_cache_warns_and_still_embeds(tmp_path):
    (tmp_path / "file").write_text("")
    torch.manual_seed(0)
    t = CLIPTeacher(MICRO, "", cache_dir=str(tmp_path / "file" / "cache"), templates="simple")
    assert t.identity["quick_gelu"] is False
    with pytest.warns(UserWarning, match="VILD_CACHE"):
        emb = t.encode_text(["cat", "dog"])
    assert emb.shape == (2, t.embed_dim)


def test_tag_unavailable_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # read at call time: no network retries
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="TEACHER.PRETRAINED /path/to/file"):
        CLIPTeacher("ViT-B-32", "openai")
    assert time.monotonic() - start < 20


def test_region_crops_cover_every_box_and_scale_and_check_lengths(teacher):
    before, teacher.batch_size = teacher.batch_size, 2  # chunks smaller than the box count
    try:
        boxes = torch.tensor([[0, 0, 30, 30], [10, 5, 60, 40], [3, 3, 9, 9]], dtype=torch.float32)
        chunks = list(teacher.region_crops([_image()], [boxes]))
        assert [(i, lo, len(c)) for i, lo, c in chunks] == [(0, 0, 2), (0, 2, 1)] * len(teacher.crop_scales)
        assert all(c.shape[1:] == (3, *teacher.image_size) for _, _, c in chunks)
        with pytest.raises(ValueError, match="2 images but 1 box"):
            teacher.embed_regions([_image(), _image()], [boxes])
    finally:
        teacher.batch_size = before


def test_region_embeddings_fill_whole_encoder_batches(teacher):
    """Crops of all images and scales go to the encoder in full batches, and match the per-crop path."""
    before, teacher.batch_size = teacher.batch_size, 4
    seen = []
    encode = teacher.model.encode_image
    teacher.model.encode_image = lambda x, **kw: seen.append(len(x)) or encode(x, **kw)
    try:
        boxes = [torch.tensor([[0, 0, 30, 30], [10, 5, 60, 40], [3, 3, 9, 9]], dtype=torch.float32),
                 torch.tensor([[2, 2, 20, 18], [0, 0, 24, 20], [5, 1, 15, 19], [1, 1, 3, 3]], dtype=torch.float32)]
        images = [_image(), _image(20, 24, seed=1)]
        out = teacher.embed_regions(images, boxes)
        assert seen == [4, 4, 4, 2]  # 14 crops; flushing per chunk would have sent 4, 2, 4, 4 ...
        # straightforward reference: each image's crops 0..1, normalised per crop, scales summed
        for i, got in enumerate(out):
            ref = torch.zeros(len(boxes[i]), 32)
            for img_idx, lo, crops in teacher.region_crops(images, boxes):
                if img_idx == i:
                    ref[lo:lo + len(crops)] += teacher.embed_crops(crops)
            assert torch.allclose(got, F.normalize(ref, dim=-1), atol=1e-5)
    finally:
        teacher.batch_size = before
        teacher.model.encode_image = encode


def test_prompts_cut_to_their_length_embed_the_same(teacher):
    """The text tower on prompts cut after the last end token gives encode_text's embeddings."""
    from vild.teacher.text_encoder import can_truncate, encode_prompts
    assert teacher._truncate_prompts and can_truncate(teacher.model)
    tokens = teacher.tokenizer(["a kite.", "a photo of a small red unicycle in the scene.", "x"])
    assert int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]  # there is padding to cut
    seen = []
    hook = teacher.model.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0].shape[1]),
                                                                 with_kwargs=True)
    try:
        with torch.no_grad():
            cut = encode_prompts(teacher.model, tokens, teacher.device, truncate=True)
            full = teacher.model.encode_text(tokens)
    finally:
        hook.remove()
    assert seen == [int(tokens.argmax(-1).max()) + 1, tokens.shape[1]]
    assert torch.allclose(cut, full, atol=1e-5)
    # a text tower that is not causal cannot be cut: padding would reach the pooled token
    teacher.model.attn_mask = None
    assert not can_truncate(teacher.model)


def test_same_weights_under_another_activation_are_another_teacher():
    """open_clip 3.x built openai tags with GELU: a store or checkpoint made then must not pass as QuickGELU's."""
    from vild.engine.checkpoint import teacher_mismatch
    gelu = {"model": "ViT-B-32", "pretrained": "openai", "sha256": None, "quick_gelu": False}
    assert "GELU" in teacher_mismatch(gelu, {**gelu, "quick_gelu": True})
    assert teacher_mismatch(gelu, dict(gelu)) == ""
    assert teacher_mismatch({"model": "ViT-B-32", "pretrained": "openai"}, gelu) == ""  # unrecorded: unknown
