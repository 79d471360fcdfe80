"""Sparse unlearning patches: only the weight rows an unlearning run changed, plus a fingerprint
of the base weights, so many unlearned variants of one base model cost kilobytes each.

A patch is a safetensors file. For every changed tensor `name` (e.g. "unet.down_blocks...weight")
it holds `name::rows` (int64 row indices) and `name::values` (those rows, the tensor's dtype);
1-D tensors count elements as rows. Its metadata holds the format version, the list of changed
tensors, the changed and total row counts and the base fingerprint (META_FIELDS, no other field).
Applying a patch to the base it was made from rebuilds the unlearned weights bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import NoReturn

import torch

FORMAT = "trust_fast.patch/1"
# what unlearning edits, and so all a patch may change: the denoiser (a UNet, or an MMDiT's
# transformer); a patch for the text encoders, the VAE or the tokenizer's tensors is refused
DENOISERS = ("unet", "transformer")
ALLOWED_PREFIXES = tuple(d + "." for d in DENOISERS)
#: a patch's metadata: all of these fields, no other
META_FIELDS = ("format", "tensors", "changed_rows", "total_rows", "base_fingerprint")
#: dtypes of a patch's values: those of a model's weights (float64 or float8 values match no model's
#: tensor, and torch cannot even test float8 ones for NaN)
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_NAME_CHARS = 1000  # a tensor name (diffusers' longest are under 200 characters)
MAX_LIST_CHARS = 1 << 22  # the tensor list's JSON (every tensor of SDXL's UNet takes about 150 KB)
_COUNT = re.compile(r"0|[1-9][0-9]{0,17}")  # a row count as make_patch writes it: below 10**18
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")  # a sha256 hexdigest


def _check_pipe(fn: str, name: str, pipe) -> None:
    if not isinstance(getattr(pipe, "components", None), dict):
        raise TypeError(f"{fn}: {name} must be a diffusers pipeline (an object with a .components dict), "
                        f"got {type(pipe).__name__}")


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def named_tensors(pipe) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the pipeline's torch components, as "component.name"."""
    _check_pipe("named_tensors", "pipe", pipe)
    out = {}
    for comp, mod in sorted(_modules(pipe).items()):
        for name, t in mod.state_dict().items():
            out[f"{comp}.{name}"] = t
    return out


def fingerprint(pipe) -> str:
    """sha256 over the names, shapes, dtypes and bytes of every tensor of the pipeline."""
    _check_pipe("fingerprint", "pipe", pipe)
    h = hashlib.sha256()
    for name, t in sorted(named_tensors(pipe).items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def diff_rows(base: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Indices of the rows (dim 0; elements for 1-D) where `new` differs from `base` bitwise."""
    for name, t in (("base", base), ("new", new)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"diff_rows: {name} must be a torch.Tensor, got {type(t).__name__}")
    if base.shape != new.shape or base.dtype != new.dtype:
        raise ValueError(f"tensor shapes/dtypes differ: {tuple(base.shape)} {base.dtype} vs {tuple(new.shape)} {new.dtype}")
    a = base.detach().cpu().contiguous().view(torch.uint8).reshape(base.shape[0], -1) if base.dim() else None
    b = new.detach().cpu().contiguous().view(torch.uint8).reshape(new.shape[0], -1) if new.dim() else None
    if a is None:
        return torch.zeros(0, dtype=torch.int64) if torch.equal(base, new) else torch.zeros(1, dtype=torch.int64)
    return (a != b).any(1).nonzero().flatten()


def _changed(fn: str, base_pipe, unlearned_pipe) -> tuple[dict[str, torch.Tensor], int, int]:
    """(tensors, changed rows, total rows) of the patch turning `base_pipe`'s weights into
    `unlearned_pipe`'s: for every tensor with changed rows, their indices and their new values."""
    for name, pipe in (("base_pipe", base_pipe), ("unlearned_pipe", unlearned_pipe)):
        _check_pipe(fn, name, pipe)
    base, new = named_tensors(base_pipe), named_tensors(unlearned_pipe)
    if set(base) != set(new):
        extra = sorted(set(base) ^ set(new))[:3]
        raise ValueError(f"the unlearned model's tensors do not match the base's (e.g. {extra}): not derived from it")
    tensors: dict[str, torch.Tensor] = {}
    changed_rows = total_rows = 0
    for name in sorted(base):
        rows = diff_rows(base[name], new[name])
        total_rows += base[name].shape[0] if base[name].dim() else 1
        if rows.numel():
            if not name.startswith(ALLOWED_PREFIXES):
                raise ValueError(f"the unlearned model differs from the base in {name!r}, outside the denoiser; "
                                 "a patch carries rows of the unet or transformer only")
            changed_rows += rows.numel()
            tensors[f"{name}::rows"] = rows
            src = new[name].detach().cpu()
            tensors[f"{name}::values"] = (src.reshape(src.shape[0], -1)[rows] if src.dim() else src.reshape(1)).contiguous()
    return tensors, changed_rows, total_rows


def make_patch(base_pipe, unlearned_pipe) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the patch turning `base_pipe`'s weights into `unlearned_pipe`'s."""
    return _make_patch("make_patch", base_pipe, unlearned_pipe)


def _make_patch(fn: str, base_pipe, unlearned_pipe) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, changed_rows, total_rows = _changed(fn, base_pipe, unlearned_pipe)
    meta = {"format": FORMAT, "base_fingerprint": fingerprint(base_pipe), "changed_rows": str(changed_rows),
            "total_rows": str(total_rows), "tensors": json.dumps(sorted({k.rsplit('::', 1)[0] for k in tensors}))}
    return tensors, meta


def export_patch(base_pipe, unlearned_pipe, path: str) -> dict:
    """Write the patch file atomically; return its statistics (bytes, rows, fraction of the denoiser:
    ``unet_bytes`` and ``fraction_of_unet`` are the transformer's of an MMDiT)."""
    from .io import save_file_atomic

    path = _checked_path("export_patch", path)
    tensors, meta = _make_patch("export_patch", base_pipe, unlearned_pipe)
    save_file_atomic(tensors, path, metadata=meta)
    unet_bytes = denoiser_bytes(unlearned_pipe)
    size = os.path.getsize(path)
    return {"patch_bytes": size, "unet_bytes": unet_bytes, "fraction_of_unet": size / unet_bytes,
            "changed_rows": int(meta["changed_rows"]), "total_rows": int(meta["total_rows"]),
            "changed_tensors": len(json.loads(meta["tensors"]))}


def denoiser_bytes(pipe) -> int:
    """Bytes of the pipeline's denoiser (the UNet, or an MMDiT's transformer) state."""
    _check_pipe("denoiser_bytes", "pipe", pipe)
    denoiser = next((getattr(pipe, d) for d in DENOISERS if getattr(pipe, d, None) is not None), None)
    if denoiser is None:
        raise ValueError(f"the pipeline {type(pipe).__name__} has no {' or '.join(DENOISERS)}")
    return sum(t.numel() * t.element_size() for t in denoiser.state_dict().values())


def patch_summary(base_pipe, unlearned_pipe) -> dict:
    """What a patch of `unlearned_pipe` against `base_pipe` would hold, without writing it or
    fingerprinting the base: ``changed_rows``, ``total_rows`` and ``fraction_of_unet`` (its changed
    rows and their indices as a fraction of the denoiser's bytes; the file adds a header)."""
    tensors, changed_rows, total_rows = _changed("patch_summary", base_pipe, unlearned_pipe)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"changed_rows": changed_rows, "total_rows": total_rows,
            "fraction_of_unet": size / denoiser_bytes(unlearned_pipe)}


def patch_fraction(base_pipe, unlearned_pipe) -> float:
    """``patch_summary(...)["fraction_of_unet"]``: the patch's share of the denoiser's bytes."""
    return patch_summary(base_pipe, unlearned_pipe)["fraction_of_unet"]


def is_patch_file(path: str | os.PathLike) -> bool:
    """True for a file whose safetensors metadata names this patch format (read without the tensors)."""
    from safetensors import safe_open

    path = _checked_path("is_patch_file", path)
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not safetensors at all
        return False


def read_patch(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The patch's tensors and metadata, checked for everything that does not need the base model:
    every metadata field (format, tensor list, row counts, fingerprint; no other field), the key
    pairs, the allowed modules (the denoiser), unique non-negative int64 rows, finite float32/float16/
    bfloat16 values and the recorded counts. ValueError (one line naming the file and the problem)
    otherwise; TypeError when `path` is not a path."""
    _, tensors, meta = _read(_checked_path("read_patch", path))
    return tensors, meta


def _checked_path(fn: str, path) -> str:
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"{fn}: path must be a str or os.PathLike, got {type(path).__name__}")
    return path


def _shown(value, limit: int = 60) -> str:
    """`value` for an error message: its repr (one line), cut to about `limit` characters."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return repr(value)


def _read(path: str) -> tuple[list[str], dict[str, torch.Tensor], dict[str, str]]:
    """(changed tensor names, tensors, metadata) of a checked patch file (see :func:`read_patch`).
    The header is checked before any tensor is read."""
    from safetensors import safe_open

    def unreadable(e: Exception) -> ValueError:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return ValueError(f"patch file {path!r} is not a readable safetensors file ({first})")

    try:
        with safe_open(path, framework="pt") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
    except FileNotFoundError:
        raise ValueError(f"patch file {path!r} does not exist") from None
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise unreadable(e) from None
    names = _check_metadata(path, meta)
    want = {f"{n}::{part}" for n in names for part in ("rows", "values")}
    if keys != want:
        _invalid(path, f"its tensors do not match its metadata's list (e.g. {_shown(sorted(keys ^ want)[0])})")
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in sorted(want)}
    except Exception as e:  # a dtype torch lacks, the file changed since the header was read
        raise unreadable(e) from None
    _check_tensors(path, names, tensors, int(meta["changed_rows"]))
    return names, tensors, meta


def _invalid(path: str, what: str) -> NoReturn:
    raise ValueError(f"patch {path!r} is invalid: {what}")


def _check_metadata(path: str, meta: dict[str, str]) -> list[str]:
    """The names of the changed tensors, after checking every metadata field of the patch at `path`."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a trust_fast patch (format {_shown(meta.get('format'))}, "
                         f"expected {FORMAT!r})")
    unknown = sorted(set(meta) - set(META_FIELDS))
    if unknown:
        _invalid(path, f"its metadata has an unknown field {_shown(unknown[0])}")
    missing = [k for k in META_FIELDS if k not in meta]
    if missing:
        _invalid(path, f"its metadata lacks the field {missing[0]!r}")
    if not _FINGERPRINT.fullmatch(meta["base_fingerprint"]):
        _invalid(path, f"its metadata's base_fingerprint {_shown(meta['base_fingerprint'])} is not a sha256 "
                       "(64 lowercase hex digits)")
    for field in ("changed_rows", "total_rows"):
        if not _COUNT.fullmatch(meta[field]):
            _invalid(path, f"its metadata's {field} {_shown(meta[field])} is not a row count (a decimal "
                           "integer from 0 to 10**18, no sign, spaces or leading zeros)")
    if int(meta["changed_rows"]) > int(meta["total_rows"]):
        _invalid(path, f"its metadata counts {meta['changed_rows']} changed rows of {meta['total_rows']}")
    text = meta["tensors"]
    if len(text) > MAX_LIST_CHARS:
        _invalid(path, f"its metadata's tensor list is {len(text)} characters long; at most {MAX_LIST_CHARS}")
    try:
        names = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: brackets nested thousands deep
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        _invalid(path, "its metadata's tensor list is not a JSON list of tensor names")
    for name in names:
        if not 0 < len(name) <= MAX_NAME_CHARS:
            _invalid(path, f"its metadata's tensor list holds a name of {len(name)} characters "
                           f"(1 to {MAX_NAME_CHARS})")
        if not name.startswith(ALLOWED_PREFIXES):
            _invalid(path, f"{_shown(name)} is outside the denoiser; a patch may change only unet.* or "
                           "transformer.* tensors")
    if len(set(names)) != len(names):
        _invalid(path, "its metadata's tensor list is not a list of distinct names")
    return names


def _check_tensors(path: str, names: list[str], tensors: dict[str, torch.Tensor], changed: int) -> None:
    """Rows: non-empty 1-D int64, unique, >= 0; values: a float dtype a model holds, one row per index,
    finite; as many rows in all as the metadata counts. (Row bounds and exact shapes need the model.)"""
    total = 0
    for name in names:
        rows, values = tensors[f"{name}::rows"], tensors[f"{name}::values"]
        if rows.dtype != torch.int64 or rows.dim() != 1 or rows.numel() == 0:
            _invalid(path, f"the rows of {name!r} are not a non-empty 1-D int64 tensor ({rows.dtype}, "
                           f"shape {tuple(rows.shape)})")
        if int(rows.min()) < 0 or rows.unique().numel() != rows.numel():
            _invalid(path, f"the rows of {name!r} hold negative or repeated indices")
        if values.dtype not in VALUE_DTYPES:
            _invalid(path, f"the values of {name!r} are {values.dtype}; patch values are float32, float16 or "
                           "bfloat16, the dtypes of a model's weights")
        if values.dim() not in (1, 2) or values.shape[0] != rows.numel():
            _invalid(path, f"{name!r} has {rows.numel()} rows but values of shape {tuple(values.shape)}")
        if not bool(torch.isfinite(values).all()):
            _invalid(path, f"the values of {name!r} are not all finite")
        total += rows.numel()
    if total != changed:
        _invalid(path, f"it holds {total} rows but its metadata counts {changed}")


@torch.no_grad()
def apply_patch(pipe, path: str | os.PathLike):
    """Apply a patch in place to `pipe` (its base model) and return it. Refuses (ValueError, one
    line) a damaged or crafted patch and a pipeline whose weights' fingerprint differs from the
    base the patch was made from; every check runs before the first write, so nothing is changed then."""
    _check_pipe("apply_patch", "pipe", pipe)
    path = _checked_path("apply_patch", path)
    names, tensors, meta = _read(path)
    have = fingerprint(pipe)
    if have != meta["base_fingerprint"]:
        raise ValueError(f"patch {path!r} was made for another base model (base fingerprint "
                         f"{meta['base_fingerprint'][:12]}..., this model {have[:12]}...)")
    current = named_tensors(pipe)
    total = sum(t.shape[0] if t.dim() else 1 for t in current.values())
    if int(meta["total_rows"]) != total:  # the fingerprint matched: the count itself was changed
        _invalid(path, f"its metadata counts {meta['total_rows']} rows in the base model, which has {total}")
    missing = [n for n in names if n not in current]
    if missing:
        raise ValueError(f"patch {path!r} names tensors this model lacks: {', '.join(map(_shown, missing[:3]))}")
    for name in names:
        t, rows, values = current[name], tensors[f"{name}::rows"], tensors[f"{name}::values"]
        n = t.shape[0] if t.dim() else 1
        if int(rows.max()) >= n:
            _invalid(path, f"row {int(rows.max())} of {name!r}, which has {n} rows")
        shape = (rows.numel(), t[0].numel()) if t.dim() else (1,)  # as make_patch stores them
        if tuple(values.shape) != shape:
            _invalid(path, f"the values of {name!r} have shape {tuple(values.shape)}, expected {shape}")
        if values.dtype != t.dtype:
            _invalid(path, f"the values of {name!r} are {values.dtype}, the model's tensor {t.dtype}")
    for name in names:
        t = current[name]
        rows, values = tensors[f"{name}::rows"], tensors[f"{name}::values"]
        if t.dim() == 0:
            t.copy_(values.reshape(()))
        else:
            t.view(t.shape[0], -1).index_copy_(0, rows.to(t.device), values.to(t.device))
    return pipe
