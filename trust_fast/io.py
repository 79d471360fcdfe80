"""Every file trust_fast writes goes through this module.

Two layers:

* :func:`claim_output`, the one output-safety rule (:mod:`trust_fast.output_claim`). A command (or
  ``TrustUnlearner.save``) claims its output path before any expensive work; the claim refuses what
  the user did not hand over, locks the path against a concurrent run, and makes the write
  all-or-nothing. The marker, temp and backup names it leaves on disk, and the recovery from an
  interrupted run, are :mod:`trust_fast.output_files`'.
* ``atomic_path`` and the ``*_atomic`` writers here: one file at a time through a temp file and a
  rename, used inside a claimed output (and by the benchmark scripts for their own result files).
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable

from .output_claim import Output, claim_output  # noqa: F401  (re-exported: trust_fast.io is the writers' one door)
from .output_files import (LOCK_TAG, MARKER, OLD_TAG, STAGING, TMP_TAG, OutputError,  # noqa: F401
                           atomic_path, in_place_file, read_marker, register_files)


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
    """`obj` as strict JSON: every non-finite float (an undefined metric) is written as null, since
    JSON has no NaN or Infinity and strict parsers refuse the bare words Python writes for them."""
    with atomic_path(path, ".json") as tmp, open(tmp, "w") as f:
        json.dump(_finite_or_none(obj), f, indent=2, allow_nan=False)


def _finite_or_none(obj):
    """`obj` with non-finite floats replaced by None, through dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def save_file_atomic(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors save_file through a temp file in the same directory. Refuses (ValueError, one
    line, nothing written) a floating tensor holding NaN or Inf: no weight file trust_fast writes
    (patches, the world's classifier) carries one."""
    from safetensors.torch import save_file

    import torch

    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all()):
            raise ValueError(f"refusing to write {path!r}: tensor {name!r} holds NaN or Inf")

    with atomic_path(path, ".safetensors") as tmp:
        save_file(tensors, tmp, metadata=metadata)


def is_json_report(path: str) -> bool:
    """True for a JSON report trust_fast wrote (it carries ``"written_by": "trust_fast"``)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and obj.get("written_by") == "trust_fast"


def save_pipeline(pipe, path: str, *, what: str = "output directory", overwrite: bool = False,
                  inputs: Iterable[tuple[str, str | None]] = ()) -> None:
    """``pipe.save_pretrained`` into a claimed directory (see :func:`claim_output`)."""
    with claim_output(path, what, overwrite=overwrite, inputs=inputs) as out:
        write_pretrained(pipe, out.path)


def write_pretrained(pipe, directory: str) -> None:
    """``pipe.save_pretrained(directory)`` in the weights variant the pipeline was loaded with
    (``pipe.trust_fast_variant``, set by trust_fast's loader), so a pipeline saved as fp16 comes
    back as fp16 files; every component keeps its dtype. Every pipeline trust_fast writes passes
    here, so none holds a NaN or Inf weight (trust_fast.guard.NonFiniteWeights, one line, before
    anything is written)."""
    from .guard import check_finite

    check_finite(pipe, "refusing to save", collective=False)
    pipe.save_pretrained(directory, variant=getattr(pipe, "trust_fast_variant", None))
