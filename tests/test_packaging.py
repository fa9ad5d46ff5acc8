"""An installed vild (a built wheel, not this checkout) carries its configs and console scripts, and detects."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"vild-detect", "vild-train", "vild-precompute", "vild-demo", "vild-export", "vild-embed",
           "vild-serve", "vild-make-world", "vild-train-clip"}


def _pyproject_scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml (read by hand: tomllib is Python 3.11+)."""
    lines = (REPO / "pyproject.toml").read_text().splitlines()
    start = lines.index("[project.scripts]") + 1
    scripts = {}
    for line in lines[start:]:
        if line.startswith("["):
            break
        if "=" in line:
            name, target = (part.strip() for part in line.split("=", 1))
            scripts[name] = target.strip('"')
    return scripts


def test_every_console_script_is_a_command_of_vild_cli_and_resolves_to_a_function():
    import importlib

    from vild.cli import COMMANDS
    scripts = _pyproject_scripts()
    assert scripts == COMMANDS and set(scripts) == SCRIPTS
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
    tools = {p.stem for p in (REPO / "tools").glob("*.py")}
    # every tool in a checkout calls one of the commands
    for tool in tools:
        text = (REPO / "tools" / f"{tool}.py").read_text()
        assert any(f"from {t.split(':')[0]} import main" in text for t in COMMANDS.values()), tool


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build the wheel from a copy of the sources and install it, without dependencies, into a folder."""
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "vild", src / "vild", ignore=shutil.ignore_patterns("__pycache__"))
    # offline and fast with the venv's setuptools (recent torch depends on it) if it can build wheels by itself
    # (70.1 and newer, or with the wheel package); else pip fetches a build environment
    isolation = ["--no-build-isolation"] if _can_build_wheels() else []
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", *isolation, "-w", str(root / "dist"), str(src)], check=True)
    wheel = next((root / "dist").glob("vild-*.whl"))
    target = root / "site"
    subprocess.run(pip + ["install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)], check=True)
    # the installed copy first on the path, ahead of this checkout's editable install
    env = {**os.environ, "PYTHONPATH": str(target)}
    return {"wheel": wheel, "target": target, "env": env, "cwd": tmp_path_factory.mktemp("elsewhere")}


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def _can_build_wheels() -> bool:
    if not _has("setuptools"):
        return False
    from importlib.metadata import version
    major, minor = (int(p) for p in version("setuptools").split(".")[:2])
    return (major, minor) >= (70, 1) or _has("wheel")


def _py(installed: dict, code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], env=installed["env"], cwd=installed["cwd"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_wheel_ships_configs_data_and_console_scripts(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    shipped = {f"vild/configs/{p.relative_to(REPO / 'vild' / 'configs')}"
               for p in (REPO / "vild" / "configs").rglob("*.yaml")}
    assert shipped and shipped <= names, f"configs missing from the wheel: {sorted(shipped - names)}"
    assert "vild/data/lvis_v1_names.txt" in names
    assert "vild/teacher/model_configs/vild-tiny-clip.json" in names
    assert "vild/synthetic/pretrained/vild-tiny-clip.pt" in names  # vild-demo's shipped teacher
    assert {f"vild/serve/static/{f}" for f in ("index.html", "app.js", "style.css")} <= names  # the page
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()
    assert SCRIPTS <= {line.split("=")[0].strip() for line in text.splitlines() if "=" in line}


def test_installed_package_finds_every_config_by_name_from_any_folder(installed):
    names = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml"))
    out = _py(installed, "import json, vild; from vild.config import load_config\n"
                         f"cfgs = {{n: load_config(n) for n in {names!r}}}\n"
                         "print(json.dumps({'file': vild.__file__, "
                         "'r50': [cfgs['vild_r50.yaml'].MODEL.VILD.VARIANT, cfgs['vild_r50.yaml'].SOLVER.MAX_ITER]}))")
    got = json.loads(out)
    assert Path(got["file"]).is_relative_to(installed["target"]), "the test must run the installed copy"
    from vild.config import load_config
    ref = load_config("vild_r50.yaml")
    assert got["r50"] == [ref.MODEL.VILD.VARIANT, ref.SOLVER.MAX_ITER]


def test_console_scripts_run(installed, world, tmp_path):
    bin_dir = installed["target"] / "bin"
    for script in SCRIPTS:
        r = subprocess.run([str(bin_dir / script), "--help"], env=installed["env"], cwd=installed["cwd"],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "usage:" in r.stdout, (script, r.stderr)
    bad = subprocess.run([str(bin_dir / "vild-train"), "--config", "no_such.yaml"], env=installed["env"],
                         cwd=installed["cwd"], capture_output=True, text=True)
    assert bad.returncode != 0 and "vild_r50.yaml" in bad.stderr, "the error lists the shipped configs"
    # the one-liner: an installed vild-detect on images of novel shapes, with the model that ships with the tests
    images = Path(world["images_val"])
    r = subprocess.run([str(bin_dir / "vild-detect"), "--weights", str(REPO / "tests/assets/demo_model/model.pth"),
                        "--vocab", "star,heart,ring,arrow", "--input", str(images),
                        "--output", str(tmp_path / "out"), "--device", "cpu", "--json", "--max-dets", "3"],
                       env={**installed["env"], "OMP_NUM_THREADS": "1"}, cwd=installed["cwd"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    dets = json.loads((tmp_path / "out" / "detections.json").read_text())
    n_images = len(list(images.glob("*.png")))
    # every image is read; images where no novel shape scores over the threshold get no detection
    assert dets and len({d["image_id"] for d in dets}) <= n_images and all(d["score"] > 0 for d in dets)
    assert len(list((tmp_path / "out").glob("*.png"))) == n_images
