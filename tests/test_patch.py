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
