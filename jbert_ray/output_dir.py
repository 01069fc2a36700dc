"""Output directories: checked before any work starts (writable, never silently overwritten); JSON files in them
read leniently and written atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from jbert_ray.errors import UserError


def prepare_output_dir(path: str | Path, overwrite: bool = False, allow_existing: bool = False) -> Path:
    """Create `path`; refuse a non-empty one unless `overwrite` (cleared) or `allow_existing` (resume)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not allow_existing:
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


def read_json(path: Path, default=None):
    """The parsed file, or `default` if it is missing or not (yet) valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def write_json(path: Path, obj) -> None:
    """Write atomically (a reader never sees half a file), creating the parent directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
