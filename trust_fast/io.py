"""Atomic writes: a reader never sees a half-written file or model directory."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a temp file path beside `path`; on success it is made world-readable and renamed
    onto `path`, on failure removed. `suffix` lets writers that infer a format from the name work."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_csv_atomic(rows: list[dict], path: str, append: bool = False) -> None:
    """Write dict rows (columns: the first row's keys) as CSV through a temp file.

    With ``append`` the rows already in ``path`` are kept ahead of the new ones;
    a file with other columns is refused (ValueError naming both) and left as it was."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    fields = list(rows[0])
    old: list[dict] = []
    if append and os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is not None and list(reader.fieldnames) != fields:
                raise ValueError(f"{path} has columns {reader.fieldnames}, the new rows {fields}: write to another file")
            old = list(reader)
    with atomic_path(str(path), ".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(old)
        w.writerows(rows)


def write_json_atomic(obj, path: str) -> None:
    with atomic_path(path, ".json") as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def save_file_atomic(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors save_file through a temp file in the same directory."""
    from safetensors.torch import save_file

    with atomic_path(path, ".safetensors") as tmp:
        save_file(tensors, tmp, metadata=metadata)


def save_pipeline_atomic(pipe, path: str) -> None:
    """save_pretrained into a temp dir beside `path`, then swap it in: never a half-written model."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    try:
        pipe.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        if os.path.exists(path):
            old = path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
