"""Sparse unlearning patches: only the weight rows an unlearning run changed, plus a fingerprint
of the base weights, so many unlearned variants of one base model cost kilobytes each.

A patch is a safetensors file. For every changed tensor `name` (e.g. "unet.down_blocks...weight")
it holds `name::rows` (int64 row indices) and `name::values` (those rows, the tensor's dtype);
1-D tensors count elements as rows. Its metadata holds the format version and the base fingerprint.
Applying a patch to the base it was made from rebuilds the unlearned weights bit for bit.
"""
from __future__ import annotations

import hashlib
import json

import torch

FORMAT = "trust_fast.patch/1"
# what unlearning edits, and so all a patch may change: the denoiser (a UNet, or an MMDiT's
# transformer); a patch for the text encoders, the VAE or the tokenizer's tensors is refused
DENOISERS = ("unet", "transformer")
ALLOWED_PREFIXES = tuple(d + "." for d in DENOISERS)


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def named_tensors(pipe) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the pipeline's torch components, as "component.name"."""
    out = {}
    for comp, mod in sorted(_modules(pipe).items()):
        for name, t in mod.state_dict().items():
            out[f"{comp}.{name}"] = t
    return out


def fingerprint(pipe) -> str:
    """sha256 over the names, shapes, dtypes and bytes of every tensor of the pipeline."""
    h = hashlib.sha256()
    for name, t in sorted(named_tensors(pipe).items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def diff_rows(base: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Indices of the rows (dim 0; elements for 1-D) where `new` differs from `base` bitwise."""
    if base.shape != new.shape or base.dtype != new.dtype:
        raise ValueError(f"tensor shapes/dtypes differ: {tuple(base.shape)} {base.dtype} vs {tuple(new.shape)} {new.dtype}")
    a = base.detach().cpu().contiguous().view(torch.uint8).reshape(base.shape[0], -1) if base.dim() else None
    b = new.detach().cpu().contiguous().view(torch.uint8).reshape(new.shape[0], -1) if new.dim() else None
    if a is None:
        return torch.zeros(0, dtype=torch.int64) if torch.equal(base, new) else torch.zeros(1, dtype=torch.int64)
    return (a != b).any(1).nonzero().flatten()


def _changed(base_pipe, unlearned_pipe) -> tuple[dict[str, torch.Tensor], int, int]:
    """(tensors, changed rows, total rows) of the patch turning `base_pipe`'s weights into
    `unlearned_pipe`'s: for every tensor with changed rows, their indices and their new values."""
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
    tensors, changed_rows, total_rows = _changed(base_pipe, unlearned_pipe)
    meta = {"format": FORMAT, "base_fingerprint": fingerprint(base_pipe), "changed_rows": str(changed_rows),
            "total_rows": str(total_rows), "tensors": json.dumps(sorted({k.rsplit('::', 1)[0] for k in tensors}))}
    return tensors, meta


def export_patch(base_pipe, unlearned_pipe, path: str) -> dict:
    """Write the patch file atomically; return its statistics (bytes, rows, fraction of the denoiser:
    ``unet_bytes`` and ``fraction_of_unet`` are the transformer's of an MMDiT)."""
    import os

    from .io import save_file_atomic

    tensors, meta = make_patch(base_pipe, unlearned_pipe)
    save_file_atomic(tensors, path, metadata=meta)
    unet_bytes = denoiser_bytes(unlearned_pipe)
    size = os.path.getsize(path)
    return {"patch_bytes": size, "unet_bytes": unet_bytes, "fraction_of_unet": size / unet_bytes,
            "changed_rows": int(meta["changed_rows"]), "total_rows": int(meta["total_rows"]),
            "changed_tensors": len(json.loads(meta["tensors"]))}


def denoiser_bytes(pipe) -> int:
    """Bytes of the pipeline's denoiser (the UNet, or an MMDiT's transformer) state."""
    denoiser = next(getattr(pipe, d) for d in DENOISERS if getattr(pipe, d, None) is not None)
    return sum(t.numel() * t.element_size() for t in denoiser.state_dict().values())


def patch_summary(base_pipe, unlearned_pipe) -> dict:
    """What a patch of `unlearned_pipe` against `base_pipe` would hold, without writing it or
    fingerprinting the base: ``changed_rows``, ``total_rows`` and ``fraction_of_unet`` (its changed
    rows and their indices as a fraction of the denoiser's bytes; the file adds a header)."""
    tensors, changed_rows, total_rows = _changed(base_pipe, unlearned_pipe)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"changed_rows": changed_rows, "total_rows": total_rows,
            "fraction_of_unet": size / denoiser_bytes(unlearned_pipe)}


def patch_fraction(base_pipe, unlearned_pipe) -> float:
    """``patch_summary(...)["fraction_of_unet"]``: the patch's share of the denoiser's bytes."""
    return patch_summary(base_pipe, unlearned_pipe)["fraction_of_unet"]


def is_patch_file(path: str) -> bool:
    """True for a file whose safetensors metadata names this patch format (read without the tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not safetensors at all
        return False


def read_patch(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The patch's tensors and metadata, checked for everything that does not need the base model:
    the format, the key pairs, the allowed modules (the denoiser), integer unique rows, finite values
    and the recorded counts. ValueError (one line naming the file and the problem) otherwise."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise ValueError(f"patch file {path!r} does not exist") from None
    except Exception as e:  # safetensors raises its own error types for a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"patch file {path!r} is not a readable safetensors file ({first})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a trust_fast patch (format {meta.get('format')!r}, expected {FORMAT!r})")
    _check_structure(path, tensors, meta)
    return tensors, meta


def _check_structure(path: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    def bad(what: str):
        raise ValueError(f"patch {path!r} is invalid: {what}")

    try:
        names = json.loads(meta.get("tensors", ""))
        changed = int(meta.get("changed_rows", ""))
    except ValueError:
        bad("its metadata lacks the tensor list or the changed-row count")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        bad("its metadata's tensor list is not a list of distinct names")
    if not isinstance(meta.get("base_fingerprint"), str) or len(meta["base_fingerprint"]) != 64:
        bad("its metadata lacks the base model's fingerprint")
    keys = {f"{n}::{part}" for n in names for part in ("rows", "values")}
    if set(tensors) != keys:
        odd = sorted(set(tensors) ^ keys)
        bad(f"its tensors do not match its metadata's list (e.g. {odd[0]!r})")
    total = 0
    for name in names:
        if not name.startswith(ALLOWED_PREFIXES):
            bad(f"{name!r} is outside the denoiser; a patch may change only unet.* or transformer.* tensors")
        rows, values = tensors[f"{name}::rows"], tensors[f"{name}::values"]
        if rows.dtype != torch.int64 or rows.dim() != 1 or rows.numel() == 0:
            bad(f"the rows of {name!r} are not a non-empty 1-D int64 tensor ({rows.dtype}, shape {tuple(rows.shape)})")
        if int(rows.min()) < 0 or rows.unique().numel() != rows.numel():
            bad(f"the rows of {name!r} hold negative or repeated indices")
        if values.dim() == 0 or values.shape[0] != rows.numel():
            bad(f"{name!r} has {rows.numel()} rows but values of shape {tuple(values.shape)}")
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            bad(f"the values of {name!r} are not all finite")
        total += rows.numel()
    if total != changed:
        bad(f"it holds {total} rows but its metadata counts {changed}")


@torch.no_grad()
def apply_patch(pipe, path: str):
    """Apply a patch in place to `pipe` (its base model) and return it. Refuses (ValueError, one
    line) a damaged or crafted patch and a pipeline whose weights' fingerprint differs from the
    base the patch was made from; every check runs before the first write, so nothing is changed then."""
    tensors, meta = read_patch(path)
    have = fingerprint(pipe)
    if have != meta["base_fingerprint"]:
        raise ValueError(f"patch {path!r} was made for another base model (base fingerprint "
                         f"{meta['base_fingerprint'][:12]}..., this model {have[:12]}...)")
    current = named_tensors(pipe)
    names = json.loads(meta["tensors"])
    missing = [n for n in names if n not in current]
    if missing:
        raise ValueError(f"patch {path!r} names tensors this model lacks: {missing[:3]}")
    for name in names:
        t, rows, values = current[name], tensors[f"{name}::rows"], tensors[f"{name}::values"]
        n = t.shape[0] if t.dim() else 1
        row_shape = (t[0].numel(),) if t.dim() else (1,)
        if int(rows.max()) >= n:
            raise ValueError(f"patch {path!r} is invalid: row {int(rows.max())} of {name!r}, which has {n} rows")
        if tuple(values.shape) != (rows.numel(), *row_shape) and not (t.dim() == 0 and values.numel() == 1):
            raise ValueError(f"patch {path!r} is invalid: the values of {name!r} have shape {tuple(values.shape)}, "
                             f"expected {(rows.numel(), *row_shape)}")
        if values.dtype != t.dtype:
            raise ValueError(f"patch {path!r} is invalid: the values of {name!r} are {values.dtype}, the model's "
                             f"tensor {t.dtype}")
    for name in names:
        t = current[name]
        rows, values = tensors[f"{name}::rows"], tensors[f"{name}::values"]
        if t.dim() == 0:
            t.copy_(values.reshape(()))
        else:
            t.view(t.shape[0], -1).index_copy_(0, rows.to(t.device), values.to(t.device))
    return pipe
