"""Configuration: defaults, YAML files with ``_BASE_`` inheritance, ``KEY VALUE`` overrides."""
from __future__ import annotations

import argparse
import ast
import copy
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

# Inside the package so an installed vild finds them too; the checkout's top-level configs/ links here.
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


class CfgNode(dict):
    """A dict with attribute access whose keys are fixed by the defaults."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(f"config has no key {name!r}") from e

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __deepcopy__(self, memo: dict) -> "CfgNode":
        return CfgNode({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def clone(self) -> "CfgNode":
        """Return a deep copy."""
        return copy.deepcopy(self)

    def to_dict(self) -> dict:
        """Return plain nested dicts (for YAML/JSON/checkpoints)."""
        return {k: (v.to_dict() if isinstance(v, CfgNode) else v) for k, v in self.items()}

    def dump(self) -> str:
        """Serialize to YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def merge(self, other: dict, prefix: str = "", allow_new: bool = False) -> "CfgNode":
        """Recursively merge ``other`` in place; unknown keys are errors naming the key."""
        for k, v in other.items():
            full = f"{prefix}{k}"
            if k not in self:
                if not allow_new:
                    raise KeyError(f"unknown config key {full!r}: check its spelling against vild/config.py")
                self[k] = _to_node(v)
                continue
            if isinstance(self[k], CfgNode):
                if not isinstance(v, dict):
                    raise TypeError(f"config key {full!r} is a section; got {v!r}")
                self[k].merge(v, prefix=full + ".", allow_new=allow_new or k in _OPEN_SECTIONS)
            else:
                self[k] = _coerce(full, self[k], v)
        return self

    def merge_from_list(self, opts: Iterable[str]) -> "CfgNode":
        """Apply ``["A.B", "value", ...]`` overrides from the command line."""
        opts = list(opts)
        if len(opts) % 2:
            raise ValueError(f"overrides come in KEY VALUE pairs; got an odd list: {opts}")
        for key, raw in zip(opts[0::2], opts[1::2]):
            node, parts = self, key.split(".")
            for i, p in enumerate(parts[:-1]):
                if p not in node or not isinstance(node[p], CfgNode):
                    raise KeyError(f"unknown config key {'.'.join(parts[:i + 1])!r} in override {key!r}")
                node = node[p]
            if parts[-1] not in node:
                raise KeyError(f"unknown config key {key!r}: check its spelling against vild/config.py")
            value = _parse_value(raw)
            if isinstance(node[parts[-1]], CfgNode) and isinstance(value, dict):
                node[parts[-1]].merge(value, prefix=key + ".", allow_new=parts[-1] in _OPEN_SECTIONS)
            else:
                node[parts[-1]] = _coerce(key, node[parts[-1]], value)
        return self


# sections whose keys are free-form (e.g. a user's own dataset entries)
_OPEN_SECTIONS = {"CUSTOM"}


def _to_node(v: Any) -> Any:
    if isinstance(v, dict):
        return CfgNode({k: _to_node(x) for k, x in v.items()})
    return v


def _parse_value(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        return raw


def _coerce(key: str, old: Any, new: Any) -> Any:
    """Keep the type of the default where it is unambiguous."""
    if old is None or new is None:
        return new
    if isinstance(old, bool):
        if isinstance(new, bool):
            return new
        raise TypeError(f"config key {key!r} expects true/false; got {new!r}")
    if isinstance(old, float) and isinstance(new, (int, float)) and not isinstance(new, bool):
        return float(new)
    if isinstance(old, int) and isinstance(new, int) and not isinstance(new, bool):
        return new
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return list(new)
    if isinstance(old, (list, tuple)) and isinstance(new, str):
        return [s for s in new.split(",") if s] if new else []
    if isinstance(old, str) and isinstance(new, (str, int, float)):
        return str(new)
    if type(old) is not type(new):
        raise TypeError(f"config key {key!r} expects {type(old).__name__}; got {new!r}")
    return new


_DEFAULTS: dict = {
    "MODEL": {
        "WEIGHTS": "",
        "DEVICE": "auto",  # auto | cpu | cuda | cuda:N
        # RGB, 0..255 scale; images enter the model as uint8 or float 0..255
        "PIXEL_MEAN": [123.675, 116.28, 103.53],
        "PIXEL_STD": [58.395, 57.12, 57.375],
        "MASK_ON": True,
        "BACKBONE": {
            "NAME": "resnet50",  # resnet18/34/50/101/152, or "tiny" (a small CNN for tests and the demo)
            "NORM": "SyncBN",  # SyncBN | BN | FrozenBN (FrozenBN needs PRETRAINED weights)
            "TRAINABLE_LAYERS": 3,
            "PRETRAINED": "",  # backbone weights file (a torchvision ResNet state dict, or a TinyCNN one); "" = random init
            "OUT_CHANNELS": 256,
            "TINY_WIDTH": 32,
            "RETURNED_LAYERS": [1, 2, 3, 4],  # ResNet stages feeding the FPN (1..4 -> P2..P5) + P6 by max-pool
        },
        "ANCHOR": {
            "SIZES": [[32], [64], [128], [256], [512]],
            "ASPECT_RATIOS": [0.5, 1.0, 2.0],
        },
        "RPN": {
            "CONV_DEPTH": 2,
            "PRE_NMS_TOPK_TRAIN": 2000,
            "POST_NMS_TOPK_TRAIN": 1000,
            "PRE_NMS_TOPK_TEST": 1000,
            "POST_NMS_TOPK_TEST": 1000,
            "NMS_THRESH": 0.7,
            "FG_IOU_THRESH": 0.7,
            "BG_IOU_THRESH": 0.3,
            "BATCH_SIZE_PER_IMAGE": 256,
            "POSITIVE_FRACTION": 0.5,
        },
        "ROI_HEADS": {
            "BATCH_SIZE_PER_IMAGE": 512,
            "POSITIVE_FRACTION": 0.25,
            "FG_IOU_THRESH": 0.5,
            "BG_IOU_THRESH": 0.5,  # below: background; between it and FG_IOU_THRESH: left out of the sample
            "SCORE_THRESH_TEST": 0.0,
            "NMS_THRESH_TEST": 0.5,
            "DETECTIONS_PER_IMAGE": 300,
            "TOPK_CANDIDATES_TEST": 1000,  # per-image candidates kept before NMS (speed lever)
            # False: NMS per class, as the COCO/LVIS protocol expects; Detector and the tools show one label per box
            "CLASS_AGNOSTIC_NMS_TEST": False,
            # scoring at evaluation (vild.modeling.postprocess.DetectionSettings); Detector has its own defaults
            "OBJECTNESS_WEIGHT_TEST": 0.0,  # w in score = p_class^(1-w) * rpn_objectness^w
            "CENTERING_TEST": 0.0,  # share of the mean region embedding subtracted before the text dot products
        },
        "ROI_BOX_HEAD": {
            "NUM_CONV": 4,
            "CONV_DIM": 256,
            "NUM_FC": 1,
            "FC_DIM": 1024,
            "NORM": "BN",  # "" | BN | SyncBN
            "POOLER_RESOLUTION": 7,
            "POOLER_SAMPLING_RATIO": 2,
            "BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
        },
        "ROI_MASK_HEAD": {
            "NUM_CONV": 4,
            "CONV_DIM": 256,
            "POOLER_RESOLUTION": 14,
            "POOLER_SAMPLING_RATIO": 2,
            "MASK_THRESHOLD": 0.5,
        },
        "VILD": {
            "VARIANT": "vild",  # text | vild | ensemble | fvlm (F-VLM: see MODEL.FVLM)
            "EMBED_DIM": 512,
            "TEMPERATURE": 0.01,
            "DISTILL_WEIGHT": 0.5,
            "ENSEMBLE_LAMBDA": 2.0 / 3.0,
            "NUM_DISTILL_PROPOSALS": 300,
        },
        # VARIANT fvlm: the teacher's frozen image trunk (TEACHER.MODEL, an open_clip ModifiedResNet) is the
        # backbone; MODEL.BACKBONE.RETURNED_LAYERS and OUT_CHANNELS shape the FPN on it
        "FVLM": {
            "ALPHA": 0.35,  # weight of CLIP's own region score for base categories (geometric ensemble)
            "BETA": 0.65,  # and for novel ones
            "VLM_TEMPERATURE": 0.01,  # softmax temperature of CLIP's region-to-text cosines
            "TRUNK_DTYPE": "",  # "" (fp32) | fp16 | bf16: the frozen trunk's weights and activations
        },
    },
    "TEACHER": {
        "MODEL": "ViT-B-32",  # any open_clip model name (see open_clip.list_models())
        "PRETRAINED": "openai",  # open_clip pretrained tag, or a local weights file
        "TEMPLATES": "vild",  # prompt-template set: vild | clip | simple | none
        "CACHE_DIR": "",  # text-embedding cache; "" = $VILD_CACHE or ~/.cache/vild
        "CROP_SCALES": [1.0, 1.5],
        "BATCH_SIZE": 256,
    },
    "DATASETS": {
        "ROOT": "",  # "" = $VILD_DATASETS or ./datasets
        "TRAIN": ["lvis_v1_train"],
        "TEST": ["lvis_v1_val"],
        "PROPOSAL_STORE": "",  # folder of the CLIP proposal store; "" = no distillation data
        "CUSTOM": {},  # NAME: {JSON: path, IMAGES: folder, TYPE: coco|lvis, SPLIT: lvis|coco_ovd|all|none}
        # category names (or synonyms) held out of training and scored as novel, in datasets whose SPLIT is all;
        # [] = none (train on every category)
        "NOVEL": [],
    },
    "INPUT": {
        "AUG": "lsj",  # lsj | resize | none
        "IMAGE_SIZE": 1024,  # LSJ canvas side / longest side in resize mode
        "LSJ_SCALE": [0.1, 2.0],
        "RANDOM_FLIP": True,
        "TEST_SIZE": 1024,  # longest side at test time
        "SIZE_DIVISIBILITY": 32,
    },
    "DATALOADER": {
        "NUM_WORKERS": 4,
    },
    "SOLVER": {
        "IMS_PER_BATCH": 16,  # total over all processes
        "OPTIMIZER": "SGD",  # SGD (the paper's) | AdamW
        "BASE_LR": 0.02,
        "MOMENTUM": 0.9,
        "WEIGHT_DECAY": 4e-5,
        "MAX_ITER": 90000,
        "WARMUP_ITERS": 1000,
        "WARMUP_FACTOR": 0.001,
        "LR_SCHEDULER": "step",  # step | cosine
        "STEPS": [60000, 80000],
        "GAMMA": 0.1,
        "CLIP_GRADIENTS": 0.0,  # max grad norm; 0 = off
        "AMP": "",  # "" | bf16 | fp16
        # every CHECKPOINT_PERIOD iterations OUTPUT_DIR gets model_NNNNNNN.pth (what --resume continues from), and
        # the last iteration writes model_final.pth; 0 = the final checkpoint only
        "CHECKPOINT_PERIOD": 5000,
        "KEEP_CHECKPOINTS": 0,  # how many model_NNNNNNN.pth to keep, the newest; 0 = all (model_final.pth always stays)
        "LOG_PERIOD": 20,  # iterations between console lines and metrics.jsonl lines
    },
    "TEST": {
        "EVAL_PERIOD": 0,  # 0 = only at the end
        "PER_CATEGORY_TABLE": False,
    },
    # tools/train_net.py trains ViLD and ViLD-ensemble in stages (vild/engine/pipeline.py): a proposal model, the
    # CLIP proposal store from its proposals (DATASETS.PROPOSAL_STORE, else OUTPUT_DIR/clip_proposals), distillation,
    # evaluation; a stage already done is reused, an interrupted one continues
    "PIPELINE": {
        # where the store's proposals come from: a checkpoint (its RPN proposes) or a COCO-results json of boxes
        # (image_id, bbox, score); "" = train ViLD-text on the base categories first, in OUTPUT_DIR/proposal_model
        "PROPOSAL_MODEL": "",
    },
    "OUTPUT_DIR": "output/vild",
    "SEED": 42,
}


def get_cfg() -> CfgNode:
    """Return a fresh copy of the default config."""
    return _to_node(copy.deepcopy(_DEFAULTS))


def resolve_config_path(name: str | os.PathLike) -> Path:
    """Find a config by path, or by bare name among the shipped ``configs/``."""
    p = Path(name).expanduser()
    if p.is_file():
        return p.resolve()
    # a shipped config by its name under configs/ ("vild_r50.yaml", "configs/synthetic/demo_base.yaml"),
    # never by the last part of another path: a typo in a path to one's own copy must not load ours
    shipped = Path(*p.parts[1:]) if p.parts[:1] == ("configs",) else p
    if not p.is_absolute() and shipped.parts and (CONFIGS_DIR / shipped).is_file():
        return CONFIGS_DIR / shipped
    known = ", ".join(sorted(q.name for q in CONFIGS_DIR.glob("*.yaml"))) if CONFIGS_DIR.is_dir() else "none"
    raise FileNotFoundError(f"config {str(name)!r} not found as a file or in {CONFIGS_DIR} (known: {known})")


def _load_yaml_with_base(path: Path, seen: tuple = ()) -> dict:
    if path in seen:
        raise ValueError(f"_BASE_ cycle in configs: {' -> '.join(map(str, seen + (path,)))}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a YAML mapping")
    base = data.pop("_BASE_", None)
    if base is None:
        return data
    base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    if not base_path.is_file():
        base_path = resolve_config_path(base)
    merged = _load_yaml_with_base(base_path.resolve(), seen + (path,))
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> CfgNode:
    """Defaults, then the YAML file (with its ``_BASE_`` chain), then ``KEY VALUE`` overrides."""
    cfg = get_cfg()
    if path:
        cfg.merge(_load_yaml_with_base(resolve_config_path(path)))
    cfg.merge_from_list(overrides)
    return cfg


def parse_args_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line whose flags may come before, between or after its ``KEY VALUE`` overrides.

    A token where a KEY is due that starts with ``-`` is a flag (with its value, if it takes one); a VALUE is
    never read as a flag, so ``SOLVER.X -1`` stays an override. The overrides land in ``args.opts``.
    """
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    options = {o: a for a in parser._actions for o in a.option_strings}
    flags: list[str] = []
    opts: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if len(opts) % 2 == 0 and tok.startswith("-") and tok != "-":
            name = tok.split("=", 1)[0]
            match = [a for o, a in options.items() if o == name] or \
                [a for o, a in options.items() if o.startswith(name) and name.startswith("--")]
            takes_value = len(match) == 1 and match[0].nargs != 0 and "=" not in tok
            flags += argv[i:i + 1 + takes_value]
            i += 1 + takes_value
            continue
        opts.append(tok)
        i += 1
    args = parser.parse_args(flags)
    args.opts = opts
    return args


def cfg_from_dict(d: dict) -> CfgNode:
    """Rebuild a config saved in a checkpoint, tolerating keys this version no longer has."""
    cfg = get_cfg()
    _merge_known(cfg, d)
    return cfg


def _merge_known(node: CfgNode, d: dict) -> None:
    for k, v in d.items():
        if k not in node:
            continue
        if isinstance(node[k], CfgNode) and isinstance(v, dict):
            if k in _OPEN_SECTIONS:
                node[k] = _to_node(v)
            else:
                _merge_known(node[k], v)
        else:
            node[k] = v
