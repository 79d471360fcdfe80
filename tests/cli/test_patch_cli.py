"""export-patch / apply-patch through the CLI on a short real unlearning run: the rebuilt model
equals the unlearned one bit for bit, and a patch refuses another base with a one-line error."""
import pytest
import os

import torch
from safetensors.torch import load_file

from trust_fast.cli import main


def _unet(d) -> dict:
    return load_file(os.path.join(d, "unet", "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_cli_patch_round_trip_after_unlearning(tmp_path, capsys):
    unlearned, patch, rebuilt = tmp_path / "red", tmp_path / "red.safetensors", tmp_path / "rebuilt"
    assert main(["unlearn", "--concept", "red", "--steps", "2", "--no-eval", "--x0-per-prompt", "1", "--x0-steps", "2",
                 "--batch-size", "4", "--min-row-updates", "1", "--out", str(unlearned)]) == 0
    assert main(["export-patch", "--base", "shapes", "--unlearned", str(unlearned), "--out", str(patch)]) == 0
    assert "% of the UNet" in capsys.readouterr().out
    assert main(["apply-patch", "--base", "shapes", "--patch", str(patch), "--out", str(rebuilt)]) == 0
    a, b = _unet(unlearned), _unet(rebuilt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert os.path.getsize(patch) < 0.05 * os.path.getsize(os.path.join(unlearned, "unet",
                                                                         "diffusion_pytorch_model.safetensors"))
    capsys.readouterr()
    other = tmp_path / "other"
    assert main(["apply-patch", "--base", str(unlearned), "--patch", str(patch), "--out", str(other)]) == 2
    err = capsys.readouterr().err
    assert "made for another base model" in err and len(err.strip().splitlines()) == 1
    assert not other.exists()
