"""Local output directories: checked before any work starts (writable, never silently overwritten). Files in
outputs, local or remote, are read and written through `storage.Store`."""

from __future__ import annotations

import shutil
from pathlib import Path

from jbert_ray.errors import UserError


def prepare_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create `path`; refuse a non-empty one unless `overwrite` (cleared)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UserError(f"output {path} is not empty: pass --overwrite to replace it")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".jbert_write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to output {path}: {error.strerror or error}") from None
    return path
