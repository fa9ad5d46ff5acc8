"""Writing files so that readers see the old content or the new, never half of it."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file to write ``path`` through: a hidden temp file beside it, fsynced and renamed over ``path`` when
    the block ends, removed if the block raises (readers never see half a file; streams may take long)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs should read like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write(path: str | os.PathLike, write: Callable[[IO], None], mode: str) -> None:
    """Write through ``write`` into a temp file beside ``path``, fsync, then rename over ``path``."""
    with atomic_open(path, mode) as f:
        write(f)


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` atomically."""
    import torch  # here, not at import: the torch-free ONNX deployment writes its files through this module

    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    _atomic_write(path, lambda f: f.write(data), "wb")


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> None:
    """``json.dump`` atomically (``dump_kwargs`` as for ``json.dump``)."""
    _atomic_write(path, lambda f: json.dump(obj, f, **dump_kwargs), "w")
