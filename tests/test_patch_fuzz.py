"""Property-based tests of the patch loader through ``trust-fast apply-patch``.

A good patch of the built-in model (rows 1 and 3 of ``unet.conv_in.weight`` changed) is mutated
one field at a time (metadata values, keys, tensors) or byte by byte (truncated, extended, one byte
changed). Whether the result is still a valid patch is decided here from the format's rules, not by
the loader: an invalid patch exits 2 with one line ``trust-fast: error: ...`` on stderr, no
traceback, no output and every file of its directory unchanged; a valid one exits 0 and the model it
writes holds exactly the patch's rows.
"""
import copy
import itertools
import json
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file  # crafted files, as a user could write them

from helpers import snapshot
from trust_fast.cli import main

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
# for mutations that get past the file checks: each example loads the model (about 0.4 s on a CPU)
FUZZ_MODEL = settings(FUZZ, max_examples=20)
NAME = "unet.conv_in.weight"
ROWS, VALUES = f"{NAME}::rows", f"{NAME}::values"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int64, torch.int32, torch.int8, torch.uint8, torch.uint64, torch.bool, torch.complex64]


@dataclass(repr=False)  # hypothesis prints the fixtures of a failing example: not the file's bytes
class Good:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]
    raw: bytes  # the file make_patch + safetensors' save_file wrote
    unet: dict[str, torch.Tensor]  # the base model's UNet weights


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Good:
    from trust_fast.patch import make_patch
    from trust_fast.world import load_pipeline

    base = load_pipeline("shapes", "cpu")
    new = copy.deepcopy(base)
    with torch.no_grad():
        new.unet.conv_in.weight[[1, 3]] += 0.5
    tensors, meta = make_patch(base, new)
    assert json.loads(meta["tensors"]) == [NAME] and tensors[ROWS].tolist() == [1, 3]
    path = tmp_path_factory.mktemp("good") / "p.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return Good(tensors, meta, path.read_bytes(), {k: v.clone() for k, v in base.unet.state_dict().items()})


_case = itertools.count()


def _case_dir(tmp_path):
    d = tmp_path / f"case{next(_case)}"
    d.mkdir()
    return d


def _expected(good: Good, name: str, rows: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The UNet weights a valid patch writing `values` into `rows` of `name` must produce."""
    key = name.removeprefix("unet.")
    w = good.unet[key].clone()
    w.view(w.shape[0], -1)[rows] = values
    return {**good.unet, key: w}


def _apply_patch(capsys, d, expected: dict[str, torch.Tensor] | None) -> None:
    """Run apply-patch on d/p.safetensors; `expected` is None for an invalid patch, else the UNet
    weights the written model must hold."""
    before = snapshot(d)
    capsys.readouterr()
    code = main(["apply-patch", "--base", "shapes", "--patch", str(d / "p.safetensors"), "--out", str(d / "out")])
    err = capsys.readouterr().err
    if expected is None:
        assert code == 2, err
        assert err.startswith("trust-fast: error: ") and len(err.splitlines()) == 1, err
        assert "Traceback" not in err
        assert not (d / "out").exists()
        assert snapshot(d) == before
        return
    assert code == 0, err
    assert {k: v for k, v in snapshot(d).items() if not k.startswith("out")} == before
    unet = load_file(d / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    assert unet.keys() == expected.keys()
    for k, v in unet.items():
        assert torch.equal(v, expected[k]), k


# ------------------------------------------------------------------------------ field by field

def _near_misses(good: Good) -> list[str]:
    fp, fmt = good.meta["base_fingerprint"], good.meta["format"]
    return ["2", " 2", "2 ", "+2", "02", "2.0", "2e0", "\u0662", "0x2", "-2", "-0", "1_0", "", "\x00",
            good.meta["total_rows"], "0" + good.meta["total_rows"], "9" * 19, "9" * 5000,
            fmt, fmt + " ", fmt.upper(), "trust_fast.patch/2", fp, fp.upper(), fp[:-1], fp + "0", fp[:-1] + "g",
            f'["{NAME}"]', f'[ "{NAME}" ]', '["\\u0075net.conv_in.weight"]', f'["{NAME}", "{NAME}"]',
            f'["{NAME}", "unet.conv_in.bias"]', f'"{NAME}"', f'{{"{NAME}": 1}}', '["text_encoder.x"]', "[]",
            "null", "[1]", '[""]', f'["unet.{"x" * 2000}"]', '["' + "u" * (1 << 22) + '"]']


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                     max_leaves=8)


def _meta_value(good: Good, field: str):
    """Text for metadata `field`: near misses, random text and JSON, huge numbers, deep nesting, and
    spellings of the right value (the tensor list in other JSON, the other fields as written)."""
    same = ([f'[ "{NAME}" ]', '["\\u0075net.conv_in.weight"]', f'\t["{NAME}"]\n'] if field == "tensors"
            else [good.meta[field]])
    return st.one_of(
        st.sampled_from(same),
        st.sampled_from(_near_misses(good)),
        st.text(max_size=30),
        st.integers().map(str),
        st.integers(10**17, 10**30).map(str),
        _JSON.map(json.dumps),
        st.integers(1, 200_000).map(lambda depth: "[" * depth + "]" * depth),
        st.lists(st.sampled_from([NAME, "unet.conv_in.bias", "transformer.x", "vae.encoder.conv_in.weight", ""]),
                 max_size=3).map(json.dumps),
        st.text(alphabet="0123456789abcdefABCDEF", min_size=63, max_size=65),
    )


def _meta_value_is_valid(good: Good, field: str, value: str) -> bool:
    """The format's rule: the tensor list must name exactly the patch's tensors (any JSON spelling);
    every other field must be exactly what make_patch wrote (counts as plain decimals, the sha256 in
    lowercase hex, the format string)."""
    if field != "tensors":
        return value == good.meta[field]
    try:
        return json.loads(value) == [NAME]
    except (ValueError, RecursionError):
        return False


@st.composite
def _tensor(draw, like: torch.Tensor) -> torch.Tensor:
    """Any dtype (float8, int, bool, complex among them; `like`'s half the time), any small shape
    (0-d, empty, `like`'s, as many rows as `like`), values from raw bytes or drawn numbers (NaN,
    +-Inf, huge, small rows)."""
    dtype = draw(st.just(like.dtype) | st.sampled_from(DTYPES))
    shape = draw(st.one_of(st.just(tuple(like.shape)), st.just(()), st.lists(st.integers(0, 4), max_size=3).map(tuple),
                           st.lists(st.integers(0, 30), max_size=2).map(lambda rest: (like.shape[0], *rest))))
    n = math.prod(shape)
    if dtype == torch.int64 and draw(st.booleans()):
        vals = draw(st.lists(st.integers(0, 31) | st.integers(-3, 40) | st.integers(-2**63, 2**63 - 1),
                             min_size=n, max_size=n))
        return torch.tensor(vals, dtype=torch.int64).reshape(shape)
    if dtype.is_floating_point and draw(st.booleans()):
        vals = draw(st.lists(st.floats(width=32), min_size=n, max_size=n))
        return torch.tensor(vals, dtype=torch.float32).to(dtype).reshape(shape)
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.tensor(list(draw(st.binary(min_size=n * size, max_size=n * size))), dtype=torch.uint8)
    return (raw & 1).bool().reshape(shape) if dtype == torch.bool else raw.view(dtype).reshape(shape)


def _rows_are_valid(good: Good, rows: torch.Tensor) -> bool:
    n = good.unet["conv_in.weight"].shape[0]
    return (rows.dtype == torch.int64 and tuple(rows.shape) == (2,) and len(set(rows.tolist())) == 2
            and all(0 <= r < n for r in rows.tolist()))


def _values_are_valid(good: Good, values: torch.Tensor) -> bool:
    return (values.dtype == torch.float32 and tuple(values.shape) == tuple(good.tensors[VALUES].shape)
            and bool(torch.isfinite(values).all()))


def _targets_a_like_tensor(good: Good, name: str) -> bool:
    """A patch of rows 1 and 3, 27 float32 elements each, fits `name` of the base model."""
    w = good.unet.get(name.removeprefix("unet.")) if name.startswith("unet.") else None
    return w is not None and w.dim() > 0 and w.shape[0] > 3 and w[0].numel() == 27 and w.dtype == torch.float32


_KEY = st.one_of(st.text(max_size=20), st.sampled_from([f"{NAME}::rows2", f"{NAME}::Rows", "unet.conv_in.bias::rows",
                                                         f"{NAME}::values::rows", NAME, "::rows"]))


@pytest.mark.parametrize("kind", ["meta value", "meta drop", "meta add", "meta rename", "rows", "values",
                                  "tensor drop", "tensor add", "tensor rename"])
@FUZZ
@given(data=st.data())
def test_a_patch_changed_field_by_field_is_refused_in_one_line_or_applied_exactly(capsys, tmp_path, good, kind,
                                                                                  data):
    tensors, meta = dict(good.tensors), dict(good.meta)
    rows, values, name = tensors[ROWS], tensors[VALUES], NAME
    if kind == "meta value":
        field = data.draw(st.sampled_from(sorted(meta)), label="field")
        meta[field] = data.draw(_meta_value(good, field), label="value")
        valid = _meta_value_is_valid(good, field, meta[field])
    elif kind in ("meta drop", "meta rename"):
        field = data.draw(st.sampled_from(sorted(meta)), label="field")
        value = meta.pop(field)
        if kind == "meta rename":
            meta[data.draw(st.text(max_size=20).filter(lambda k: k not in good.meta), label="new name")] = value
        valid = False
    elif kind == "meta add":
        meta[data.draw(st.text(max_size=20).filter(lambda k: k not in meta), label="field")] = data.draw(
            _meta_value(good, "tensors"), label="value")
        valid = False
    elif kind == "rows":
        rows = tensors[ROWS] = data.draw(_tensor(rows), label="rows")
        valid = _rows_are_valid(good, rows)
    elif kind == "values":
        values = tensors[VALUES] = data.draw(_tensor(values), label="values")
        valid = _values_are_valid(good, values)
    elif kind in ("tensor drop", "tensor rename"):
        key = data.draw(st.sampled_from([ROWS, VALUES]), label="key")
        t = tensors.pop(key)
        if kind == "tensor rename":
            tensors[data.draw(_KEY.filter(lambda k: k not in good.tensors and k != "__metadata__"), label="to")] = t
        valid = False
    elif kind == "tensor add":
        key = data.draw(_KEY.filter(lambda k: k not in tensors and k != "__metadata__"), label="key")
        tensors[key] = data.draw(_tensor(rows), label="tensor")
        valid = False
    event(f"{kind}: {'valid' if valid else 'invalid'}")
    d = _case_dir(tmp_path)
    save_file(tensors, str(d / "p.safetensors"), metadata=meta)
    _apply_patch(capsys, d, _expected(good, NAME, rows, values) if valid else None)


@FUZZ_MODEL
@given(data=st.data())
def test_a_patch_retargeted_to_another_tensor_is_refused_in_one_line_or_applied_exactly(capsys, tmp_path, good,
                                                                                       data):
    """The same rows and values, for another tensor in both keys and the list: fine only for a tensor
    of the base model's denoiser with more than 3 rows of 27 float32 elements."""
    name = data.draw(st.one_of(
        st.just(NAME), st.sampled_from(["unet." + k for k in sorted(good.unet)]), st.text(max_size=30),
        st.sampled_from(["unet.nonexistent.weight", "transformer.conv_in.weight", "vae.decoder.conv_in.weight",
                         "text_encoder.text_model.final_layer_norm.weight"])), label="name")
    valid = _targets_a_like_tensor(good, name)
    event(f"retarget: {'valid' if valid else 'invalid'}")
    d = _case_dir(tmp_path)
    save_file({f"{name}::rows": good.tensors[ROWS], f"{name}::values": good.tensors[VALUES]},
                     str(d / "p.safetensors"), metadata={**good.meta, "tensors": json.dumps([name])})
    _apply_patch(capsys, d, _expected(good, name, good.tensors[ROWS], good.tensors[VALUES]) if valid else None)


# ------------------------------------------------------------------------------ byte by byte

def _layout(good: Good) -> tuple[int, dict]:
    """(header length, header object) of the good file, read with the standard library."""
    n = int.from_bytes(good.raw[:8], "little")
    return n, json.loads(good.raw[8:8 + n])


def _flipped_is_valid(good: Good, raw: bytes) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, values) of a file that differs from the good one in one byte, when it is still a
    valid patch: a header that parses (standard-library JSON) to the same object after the same
    length prefix, or data whose rows stay distinct and in range and whose values stay finite."""
    n, header = _layout(good)
    if raw[:8] != good.raw[:8]:
        return None
    try:
        same = json.loads(raw[8:8 + n].decode("utf-8")) == header
    except ValueError:  # UnicodeDecodeError included
        same = False
    if not same:
        return None
    parts = {}
    for key in (ROWS, VALUES):
        start, end = header[key]["data_offsets"]
        dtype = {"I64": torch.int64, "F32": torch.float32}[header[key]["dtype"]]
        parts[key] = torch.tensor(list(raw[8 + n + start:8 + n + end]), dtype=torch.uint8).view(dtype).reshape(
            header[key]["shape"])
    if not (_rows_are_valid(good, parts[ROWS]) and _values_are_valid(good, parts[VALUES])):
        return None
    return parts[ROWS], parts[VALUES]


def _damaged(capsys, tmp_path, good: Good, data, kind: str) -> None:
    raw, (n, _) = good.raw, _layout(good)
    if kind == "truncate":
        new, found = raw[:data.draw(st.integers(0, len(raw) - 1), label="length")], None
    elif kind == "extend":
        new, found = raw + data.draw(st.binary(min_size=1, max_size=64), label="tail"), None
    else:
        lo, hi = (0, 8 + n - 1) if kind == "header byte" else (8 + n, len(raw) - 1)
        pos = data.draw(st.integers(lo, hi), label="position")
        byte = data.draw(st.integers(0, 255).filter(lambda b: b != raw[pos]), label="byte")
        new = raw[:pos] + bytes([byte]) + raw[pos + 1:]
        found = _flipped_is_valid(good, new)
    event(f"{kind}: {'invalid' if found is None else 'valid'}")
    d = _case_dir(tmp_path)
    (d / "p.safetensors").write_bytes(new)
    _apply_patch(capsys, d, None if found is None else _expected(good, NAME, *found))


@pytest.mark.parametrize("kind", ["truncate", "extend", "header byte"])
@FUZZ
@given(data=st.data())
def test_a_damaged_patch_file_is_refused_in_one_line(capsys, tmp_path, good, kind, data):
    """Cut short, extended, or one byte of its length prefix or JSON header changed (a header that
    still parses to the same object, e.g. other padding whitespace, must apply)."""
    _damaged(capsys, tmp_path, good, data, kind)


@FUZZ_MODEL
@given(data=st.data())
def test_a_patch_with_a_changed_data_byte_is_refused_in_one_line_or_applied_exactly(capsys, tmp_path, good, data):
    """One byte of the rows or values changed: applied when the rows stay distinct and in range and
    the values finite, refused otherwise."""
    _damaged(capsys, tmp_path, good, data, "data byte")


def test_the_good_patch_applies_and_the_probe_failures_are_one_line(capsys, tmp_path, good):
    """The unmutated patch applies; the two inputs a probe crashed the loader with are refused."""
    d = _case_dir(tmp_path)
    save_file(good.tensors, str(d / "p.safetensors"), metadata=good.meta)
    _apply_patch(capsys, d, _expected(good, NAME, good.tensors[ROWS], good.tensors[VALUES]))
    nested = _case_dir(tmp_path)
    save_file(good.tensors, str(nested / "p.safetensors"),
                     metadata={**good.meta, "tensors": "[" * 200_000 + "]" * 200_000})
    _apply_patch(capsys, nested, None)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        d = _case_dir(tmp_path)
        save_file({**good.tensors, VALUES: good.tensors[VALUES].to(dtype)}, str(d / "p.safetensors"),
                         metadata=good.meta)
        _apply_patch(capsys, d, None)
