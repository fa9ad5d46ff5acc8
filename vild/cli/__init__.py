"""The command lines of vild: one module per command, each with its parser and ``main(argv) -> exit status``.

An installed vild has each as a console script (``[project.scripts]`` in pyproject.toml, which lists the same
entry points as ``COMMANDS``); a checkout runs the same ``main`` through ``tools/*.py``. A command whose work
returns results (``train``, ``precompute``, ``train_clip``) also has ``run(argv) -> dict`` for Python callers.
Nothing heavy is imported here: each command loads torch only once its arguments are checked.
"""
from __future__ import annotations

# console script -> "module:function"
COMMANDS = {
    "vild-detect": "vild.cli.detect:main",
    "vild-train": "vild.cli.train:main",
    "vild-precompute": "vild.cli.precompute:main",
    "vild-demo": "vild.cli.demo:main",
    "vild-export": "vild.cli.export:main",
    "vild-embed": "vild.cli.embed:main",
    "vild-serve": "vild.cli.serve:main",
    "vild-make-world": "vild.cli.make_world:main",
    "vild-train-clip": "vild.cli.train_clip:main",
}
