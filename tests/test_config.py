import pytest

from vild.config import CONFIGS_DIR, cfg_from_dict, get_cfg, load_config, resolve_config_path


def test_base_inheritance_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("SOLVER: {BASE_LR: 0.1, MAX_ITER: 10}\nMODEL: {VILD: {VARIANT: text}}\n")
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: base.yaml\nSOLVER: {MAX_ITER: 20}\n")
    cfg = load_config(child, ["SOLVER.STEPS", "[5, 8]", "MODEL.VILD.DISTILL_WEIGHT", "2", "MODEL.MASK_ON", "False"])
    assert cfg.SOLVER.BASE_LR == 0.1 and cfg.SOLVER.MAX_ITER == 20
    assert cfg.MODEL.VILD.VARIANT == "text"
    assert cfg.SOLVER.STEPS == [5, 8]
    assert cfg.MODEL.VILD.DISTILL_WEIGHT == 2.0 and isinstance(cfg.MODEL.VILD.DISTILL_WEIGHT, float)
    assert cfg.MODEL.MASK_ON is False


def test_unknown_keys_are_errors_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("SOLVER: {BASE_LRR: 0.1}\n")
    with pytest.raises(KeyError, match="SOLVER.BASE_LRR"):
        load_config(bad)
    with pytest.raises(KeyError, match="MODEL.VILD.TEMP"):
        load_config(None, ["MODEL.VILD.TEMP", "0.1"])
    with pytest.raises(ValueError, match="pairs"):
        load_config(None, ["SOLVER.MAX_ITER"])


def test_bare_config_name_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("vild_r50.yaml", "vild_r50_ensemble.yaml", "vild_r50_coco.yaml"):
        assert resolve_config_path(name) == CONFIGS_DIR / name
        load_config(name)
    with pytest.raises(FileNotFoundError, match="known"):
        resolve_config_path("nope.yaml")
    assert resolve_config_path("configs/vild_r50.yaml") == CONFIGS_DIR / "vild_r50.yaml"
    assert resolve_config_path("synthetic/demo_base.yaml") == CONFIGS_DIR / "synthetic" / "demo_base.yaml"
    # a mistyped path to one's own edited copy is an error, not the shipped file of the same name
    with pytest.raises(FileNotFoundError):
        resolve_config_path("my_experiments/typo_dir/vild_r50.yaml")


def test_paper_architecture_values():
    cfg = load_config("vild_r50.yaml")
    assert cfg.MODEL.BACKBONE.NAME == "resnet50"
    assert cfg.MODEL.VILD.TEMPERATURE == 0.01 and cfg.MODEL.VILD.DISTILL_WEIGHT == 0.5
    assert cfg.MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE == 300 and cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST == 0.5
    assert cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS == [10.0, 10.0, 5.0, 5.0]
    assert load_config("vild_r50_ensemble.yaml").MODEL.VILD.VARIANT == "ensemble"


def test_checkpoint_config_round_trip():
    cfg = get_cfg()
    cfg.SOLVER.MAX_ITER = 7
    d = cfg.to_dict()
    d["REMOVED_KEY"] = 1
    assert cfg_from_dict(d).SOLVER.MAX_ITER == 7


@pytest.mark.parametrize("path", sorted(CONFIGS_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS_DIR)))
def test_every_shipped_config_loads_and_builds_its_model(path):
    """Every YAML a user can name builds: unknown keys, bad _BASE_ chains or shapes would fail here."""
    from vild.modeling import build_model
    cfg = load_config(str(path.relative_to(CONFIGS_DIR)))
    if cfg.MODEL.VILD.VARIANT == "fvlm":
        cfg.TEACHER.PRETRAINED = ""  # F-VLM's trunk is the teacher's: its architecture, without downloading weights
    model = build_model(cfg, load_pretrained=False)
    assert model.roi_heads.variant == cfg.MODEL.VILD.VARIANT
    assert (model.roi_heads.image_head is not None) == (cfg.MODEL.VILD.VARIANT == "ensemble")
    assert model.embed_dim > 0 and sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("variant,name", [("ViLD-text", "vild_text"), ("ViLD", "vild"), ("ViLD-ensemble", "vild_ensemble"),
                                          ("oracle (all categories)", "oracle")])
def test_demo_detectors_ship_as_configs(variant, name):
    """configs/synthetic/NAME.yaml is the config the full demo (vild-demo --full) builds in code, apart from where
    outputs go."""
    from pathlib import Path

    from vild.synthetic.demo import VARIANTS, DemoSettings, demo_config
    out = Path("output/demo")
    world = {f"{k}_{s}": str(out / "world" / (f"lvis_{s}.json" if k == "lvis" else f"images/{s}"))
             for k in ("lvis", "images") for s in ("train", "val")}
    kind, split, distills = VARIANTS[variant]
    demo = demo_config(out, DemoSettings.full(), world, out / "teacher" / "vild-tiny-clip.pt", kind, split,
                       out / "clip_proposals" if distills else None).to_dict()
    shipped = load_config(f"synthetic/{name}.yaml").to_dict()
    for d in (demo, shipped):  # where outputs and caches go
        d.pop("OUTPUT_DIR"), d["TEACHER"].pop("CACHE_DIR"), d["DATASETS"].pop("PROPOSAL_STORE"), d.pop("PIPELINE", None)
    assert shipped == demo
