"""File-system helpers every layer may use: atomic writes and the paths of a saved model.

They live at the bottom of the package (no ``lowbitsr`` imports) so that models, quantization,
training and deployment can all write files without importing one another;
:mod:`lowbitsr.checkpoint` re-exports them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "model_paths"]


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then atomically rename ``tmp_path`` to ``path``.

    The temporary file lives in the destination folder so the final ``os.replace`` is atomic;
    on any exception it is removed and the previous ``path`` (if any) is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created 0o666 & ~umask (mkstemp would give 0o600); kept through write(), which may
    # recreate the file with its own mode (safetensors writes 0o600).
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode & 0o777
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def model_paths(path: str | Path) -> tuple[Path, Path]:
    """``(weights, config)`` paths for a saved model given its folder, stem, or either file.

    A folder means ``<folder>/model.safetensors``; a path ending in ``.json`` or
    ``.safetensors`` names that pair; any other path is taken as the stem.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "model"
    elif p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_suffix(".safetensors"), p.with_suffix(".json")
