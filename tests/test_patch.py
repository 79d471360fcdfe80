"""Sparse unlearning patches: export, bit-exact apply, refusal of another base."""
import copy

import pytest
import torch

from trust_fast.patch import (apply_patch, diff_rows, export_patch, fingerprint, patch_fraction, patch_summary,
                              read_patch)


@pytest.fixture(scope="module")
def base():
    from trust_fast.world.train import build_untrained_pipeline

    return build_untrained_pipeline(seed=3)


def _edit(pipe):
    out = copy.deepcopy(pipe)
    with torch.no_grad():
        blk = out.unet.down_blocks[1].attentions[0].transformer_blocks[0]
        blk.attn2.to_k.weight[[0, 5, 6]] *= 0.5
        blk.attn2.to_out[0].bias[2] += 1e-3
        out.unet.conv_in.weight[1, 0, 0, 0] = -out.unet.conv_in.weight[1, 0, 0, 0]  # one element of a 4-D row
    return out


def test_patch_round_trip_is_bit_exact_and_small(base, tmp_path):
    unlearned = _edit(base)
    path = str(tmp_path / "p.safetensors")
    stats = export_patch(base, unlearned, path)
    assert stats["changed_rows"] == 5 and stats["changed_tensors"] == 3
    assert stats["fraction_of_unet"] < 0.01
    # the same figure without a file: the patch's tensors, without the file's header
    header = (stats["patch_bytes"] - patch_fraction(base, unlearned) * stats["unet_bytes"])
    assert 0 < header < 4096
    rebuilt = apply_patch(copy.deepcopy(base), path)
    assert fingerprint(rebuilt) == fingerprint(unlearned)
    for (n, a), (_, b) in zip(rebuilt.unet.state_dict().items(), unlearned.unet.state_dict().items()):
        assert torch.equal(a, b), n


def test_patch_summary_matches_the_file_without_fingerprinting(base, tmp_path, monkeypatch):
    unlearned = _edit(base)
    stats = export_patch(base, unlearned, str(tmp_path / "p.safetensors"))

    def no_hash(pipe):
        raise AssertionError("patch_summary hashed the base model's weights")

    monkeypatch.setattr("trust_fast.patch.fingerprint", no_hash)  # a full hash of the weights at SD scale
    summary = patch_summary(base, unlearned)
    assert (summary["changed_rows"], summary["total_rows"]) == (stats["changed_rows"], stats["total_rows"])
    assert summary["fraction_of_unet"] == patch_fraction(base, unlearned) < stats["fraction_of_unet"]


def test_patch_refuses_another_base_and_changes_nothing(base, tmp_path):
    path = str(tmp_path / "p.safetensors")
    export_patch(base, _edit(base), path)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.unet.conv_out.bias[0] += 1.0
    before = fingerprint(other)
    with pytest.raises(ValueError, match="made for another base model"):
        apply_patch(other, path)
    assert fingerprint(other) == before


def test_bad_patch_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_patch(str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        read_patch(str(junk))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a trust_fast patch"):
        read_patch(str(tmp_path / "other.safetensors"))


def test_diff_rows_is_bitwise():
    a = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    b = a.clone()
    b[1, 0] = -0.0 + 2.0
    assert diff_rows(a, b).tolist() == []
    c = a.clone()
    c[0, 0] = -0.0  # equal as a number, different bits
    assert diff_rows(a, c).tolist() == [0]


def test_the_api_refuses_what_is_not_a_pipeline_a_path_or_a_tensor(base, tmp_path):
    from trust_fast.patch import is_patch_file

    path = tmp_path / "p.safetensors"
    export_patch(base, _edit(base), path)  # a pathlib.Path is a path
    assert is_patch_file(path) and read_patch(path)[1]["changed_rows"] == "5"
    pipe = "a diffusers pipeline (an object with a .components dict)"
    for call, message in [
        (lambda: read_patch(None), "read_patch: path must be a str or os.PathLike, got NoneType"),
        (lambda: is_patch_file(b"p.safetensors"), "is_patch_file: path must be a str or os.PathLike, got bytes"),
        (lambda: apply_patch(copy.deepcopy(base), 3), "apply_patch: path must be a str or os.PathLike, got int"),
        (lambda: apply_patch(None, path), f"apply_patch: pipe must be {pipe}, got NoneType"),
        (lambda: apply_patch(base.unet, path), f"apply_patch: pipe must be {pipe}, got UNet2DConditionModel"),
        (lambda: export_patch(base, object(), tmp_path / "q.safetensors"),
         f"export_patch: unlearned_pipe must be {pipe}, got object"),
        (lambda: export_patch(base, base, None), "export_patch: path must be a str or os.PathLike, got NoneType"),
        (lambda: patch_summary([], base), f"patch_summary: base_pipe must be {pipe}, got list"),
        (lambda: patch_fraction(base, 1.0), f"patch_summary: unlearned_pipe must be {pipe}, got float"),
        (lambda: fingerprint({}), f"fingerprint: pipe must be {pipe}, got dict"),
        (lambda: diff_rows(None, torch.zeros(2)), "diff_rows: base must be a torch.Tensor, got NoneType"),
        (lambda: diff_rows(torch.zeros(2), [0.0, 0.0]), "diff_rows: new must be a torch.Tensor, got list"),
    ]:
        with pytest.raises(TypeError) as e:
            call()
        assert str(e.value) == message
    assert not (tmp_path / "q.safetensors").exists()


def _rewritten(src: str, dst: str, meta: dict | None = None, drop: str | None = None,
               tensors: dict | None = None) -> str:
    """The patch at `src` with metadata fields replaced (`meta`), one dropped, tensors replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, framework="pt") as f:
        m, t = {**f.metadata(), **(meta or {})}, {k: f.get_tensor(k) for k in f.keys()}
    m.pop(drop, None)
    save_file({**t, **(tensors or {})}, dst, metadata=m)
    return dst


@pytest.fixture(scope="module")
def good_patch(base, tmp_path_factory):
    """(path, metadata) of a patch of `base` (5 rows of 3 tensors)."""
    path = str(tmp_path_factory.mktemp("patch") / "p.safetensors")
    export_patch(base, _edit(base), path)
    return path, read_patch(path)[1]


@pytest.mark.parametrize("change,message", [
    (dict(changed_rows=" 5"), "its metadata's changed_rows ' 5' is not a row count (a decimal integer"),
    (dict(changed_rows="05"), "its metadata's changed_rows '05' is not a row count"),
    (dict(changed_rows="-5"), "its metadata's changed_rows '-5' is not a row count"),
    (dict(changed_rows="\u0665"), "its metadata's changed_rows '\u0665' is not a row count"),
    (dict(total_rows="9" * 5000),
     "its metadata's total_rows '" + "9" * 60 + "'... (5000 characters) is not a row count"),
    (dict(total_rows="4"), "its metadata counts 5 changed rows of 4"),
    (dict(base_fingerprint="A" * 64),
     "its metadata's base_fingerprint '" + "A" * 60 + "'... (64 characters) is not a sha256"),
    (dict(base_fingerprint="a\nb"), r"its metadata's base_fingerprint 'a\nb' is not a sha256"),
    (dict(tensors="[" * 100_000 + "]" * 100_000), "its metadata's tensor list is not a JSON list of tensor names"),
    (dict(tensors='{"unet.x": 1}'), "its metadata's tensor list is not a JSON list of tensor names"),
    (dict(tensors='["unet.' + "x" * 2000 + '"]'),
     "its metadata's tensor list holds a name of 2005 characters (1 to 1000)"),
    (dict(tensors='["unet.a", "unet.a"]'), "its metadata's tensor list is not a list of distinct names"),
    (dict(tensors=" " * (1 << 22) + "[]"), "its metadata's tensor list is 4194306 characters long; at most 4194304"),
    (dict(extra="1"), "its metadata has an unknown field 'extra'"),
    ("total_rows", "its metadata lacks the field 'total_rows'"),
    ("base_fingerprint", "its metadata lacks the field 'base_fingerprint'"),
])
def test_each_metadata_field_is_checked(good_patch, tmp_path, change, message):
    meta, drop = (change, None) if isinstance(change, dict) else (None, change)
    path = _rewritten(good_patch[0], str(tmp_path / "bad.safetensors"), meta, drop)
    with pytest.raises(ValueError) as e:
        read_patch(path)
    assert str(e.value).startswith(f"patch {path!r} is invalid: {message}") and len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn, torch.float8_e5m2, torch.int64, torch.bool,
                                   torch.complex64, torch.uint8])
def test_values_of_a_dtype_no_model_holds_are_refused(good_patch, tmp_path, dtype):
    name = "unet.conv_in.weight"
    values = read_patch(good_patch[0])[0][f"{name}::values"]
    path = _rewritten(good_patch[0], str(tmp_path / "bad.safetensors"), tensors={f"{name}::values": values.to(dtype)})
    with pytest.raises(ValueError) as e:
        read_patch(path)
    assert str(e.value) == (f"patch {path!r} is invalid: the values of {name!r} are {dtype}; patch values are "
                            "float32, float16 or bfloat16, the dtypes of a model's weights")


def test_a_changed_total_row_count_is_refused_when_applied_and_changes_nothing(base, good_patch, tmp_path):
    total = int(good_patch[1]["total_rows"])
    path = _rewritten(good_patch[0], str(tmp_path / "bad.safetensors"), dict(total_rows=str(total + 1)))
    read_patch(path)  # plausible without the model
    pipe = copy.deepcopy(base)
    message = rf"its metadata counts {total + 1} rows in the base model, which has {total}$"
    with pytest.raises(ValueError, match=message):
        apply_patch(pipe, path)
    assert fingerprint(pipe) == fingerprint(base)
