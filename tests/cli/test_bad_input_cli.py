"""Bad input at the command line that once escaped the one-line promise (an outside probe's
findings): --device, --compile-unet, argparse's usage errors, model directories with a broken
safetensors header, an unsupported pipeline class, missing or pickled weights, and a report value
(an attack's recovery) that is undefined. Each refusal: exit 2, one line `trust-fast: error: ...`
naming the problem, no library warnings before it, nothing written (test_output_safety.refused)."""
import json
import pickle
import shutil

import pytest
import torch

from test_output_safety import refused
from trust_fast.cli import main
from trust_fast.world import model_path

GEN = ["generate", "--prompt", "a red circle", "--n", "1", "--steps", "1"]


def _shapes_copy(root):
    """A copy of the built-in model in `root`, to break."""
    model = root / "model"
    shutil.copytree(model_path("shapes"), model)
    return model


def _with_header(model, header: bytes) -> str:
    """The model's UNet weights replaced by a safetensors file whose header is `header`."""
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(len(header).to_bytes(8, "little") + header)
    return str(weights)


# ------------------------------------------------------------------------------------ --device


@pytest.mark.parametrize("device,cuda_count,message", [
    ("foo", None, "--device 'foo' is not a torch device (e.g. cpu, cuda, cuda:1)"),
    ("cuda:0", 0, "--device 'cuda:0': no CUDA device is available"),
    ("cuda", 0, "--device 'cuda': no CUDA device is available"),
    ("cuda:2", 2, "--device 'cuda:2': this machine has 2 CUDA device(s), cuda:0 to cuda:1"),
    ("meta", None, "--device 'meta' holds shapes without data"),
])
@pytest.mark.parametrize("command", [
    GEN,
    ["evaluate", "--concept", "red", "--n-per-prompt", "1", "--steps", "1"],
    ["unlearn", "--concept", "red", "--steps", "1", "--no-eval"],
])
def test_a_device_torch_cannot_parse_or_this_machine_lacks(capsys, tmp_path, monkeypatch, command, device,
                                                         cuda_count, message):
    if cuda_count is not None:  # the same answer on a CPU-only build and on a GPU machine
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_count)
    refused(capsys, tmp_path, [*command, "--device", device, "--out", str(tmp_path / "out")], message)


# ------------------------------------------------------------------------------- --compile-unet


def test_an_unknown_compile_backend_names_the_allowed_ones(capsys, tmp_path):
    unlearn = ["unlearn", "--concept", "red", "--steps", "1", "--no-eval", "--out", str(tmp_path / "out")]
    refused(capsys, tmp_path, [*unlearn, "--compile-unet", "bogus"],
            "--compile-unet 'bogus' is not a backend trust_fast compiles with; choose aot_eager, eager")
    # inductor is a real backend: it keeps the explanation of why it is refused
    refused(capsys, tmp_path, [*unlearn, "--compile-unet", "inductor"], "weight gradients are wrong")


# ------------------------------------------------------------------------------ argparse errors


@pytest.mark.parametrize("args,line", [
    (["generate", "--prompt", "x", "--out", "o", "--bogus"],
     "trust-fast: error: unrecognized arguments: --bogus (see trust-fast generate --help)"),
    (["generate", "--out", "o"],
     "trust-fast: error: the following arguments are required: --prompt (see trust-fast generate --help)"),
    (["generate", "--prompt", "x", "--out", "o", "--n", "abc"],
     "trust-fast: error: argument --n: invalid int value: 'abc' (see trust-fast generate --help)"),
    (["world", "train", "--what", "all"],
     "trust-fast: error: the following arguments are required: --out (see trust-fast world train --help)"),
    (["unlearn"], "trust-fast: error: the following arguments are required: --concept, --out "
                  "(see trust-fast unlearn --help)"),
])
def test_usage_errors_are_one_line_pointing_at_help(capsys, args, line):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""


def test_help_still_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0 and "--prompt" in capsys.readouterr().out


# ------------------------------------------------------------------------------ model directories


@pytest.mark.parametrize("header,problem", [(b"[1,2]", "is a JSON list, not an object of tensor entries"),
                                            (b'{"a": 1}', "has entry 'a' that is a JSON int, not an object")])
@pytest.mark.parametrize("command", [["unlearn", "--concept", "red"], GEN])
def test_a_safetensors_header_of_the_wrong_json_type(capsys, tmp_path, command, header, problem):
    model = _shapes_copy(tmp_path)
    weights = _with_header(model, header)
    refused(capsys, tmp_path, [*command, "--model", str(model), "--out", str(tmp_path / "out")],
            f"cannot load model {str(model)!r}: the safetensors header of {weights!r} {problem}")


def test_an_unsupported_pipeline_class_is_named_before_diffusers_loads_it(capsys, tmp_path):
    model = _shapes_copy(tmp_path)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))
    refused(capsys, tmp_path, [*GEN, "--model", str(model), "--out", str(tmp_path / "out")],
            f"model {str(model)!r} is a StableDiffusionInpaintPipeline, which trust_fast does not support; "
            "supported: StableDiffusionPipeline")


@pytest.mark.parametrize("file,key,value", [
    ("scheduler/scheduler_config.json", "num_train_timesteps", 10**12),
    ("text_encoder/config.json", "vocab_size", 10**9),
])
def test_a_config_number_no_model_has_is_refused_before_diffusers_allocates(capsys, tmp_path, file, key, value):
    """num_train_timesteps 1e12 made diffusers allocate 23 GB (and the machine swap) before failing."""
    model = _shapes_copy(tmp_path)
    path = tmp_path / "model" / file
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    refused(capsys, tmp_path, [*GEN, "--model", str(model), "--out", str(tmp_path / "out")],
            f"{key} = {value} in {str(path)!r} is beyond any model trust_fast supports (at most 1,000,000)")


def test_missing_weights_are_one_line_without_library_logs(capsys, tmp_path):
    model = _shapes_copy(tmp_path)
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    refused(capsys, tmp_path, [*GEN, "--model", str(model), "--out", str(tmp_path / "out")],
            "no file named diffusion_pytorch_model.safetensors")


class _RunsCode:
    """Unpickling this creates a file: the proof that a pickle was loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("folder,name", [("unet", "diffusion_pytorch_model.bin"),
                                         ("text_encoder", "pytorch_model.bin")])
def test_pickled_weights_are_refused_never_unpickled(capsys, tmp_path, folder, name):
    model = _shapes_copy(tmp_path)
    for f in (model / folder).glob("*.safetensors"):
        f.unlink()
    (model / folder / name).write_bytes(pickle.dumps({"weight": _RunsCode(str(tmp_path / "unpickled"))}))
    # refused() also proves that nothing appeared: the file the pickle would create included
    refused(capsys, tmp_path, [*GEN, "--model", str(model), "--out", str(tmp_path / "out")],
            f"its {folder} weights are a pickle file ({str(model / folder / name)!r}), which trust_fast never loads")


# ------------------------------------------------------------------------- undefined report values


def test_an_undefined_recovery_is_null_in_the_report_and_explained(capsys, tmp_path):
    """The original evaluated against itself: unlearning moved nothing (forget_change 0) while the
    soft-prompt attack moves any image, so the attack's recovery has no span to be a fraction of."""
    from tiny_pipelines import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(tmp_path / "original")
    (tmp_path / "forget.txt").write_text("a red circle\n")
    out = tmp_path / "r.json"
    assert main(["evaluate", "--model", str(tmp_path / "original"), "--reference", str(tmp_path / "original"),
                 "--concept", "red", "--forget-prompts", str(tmp_path / "forget.txt"), "--n-per-prompt", "2",
                 "--steps", "1", "--attack", "softprompt", "--softprompt-steps", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in a JSON report"))
    assert report["forget_change"] == 0.0 and report["softprompt_change_original"] > 0
    assert report["softprompt_recovery"] is None
    printed = capsys.readouterr().out
    row = printed.splitlines()[1].split()
    assert row[printed.splitlines()[0].split().index("softprompt_recovery") + 1] == "n/a", printed
    assert "note: softprompt_recovery is n/a: the softprompt attack moved the original model's images" in printed


# ------------------------------------------------------------------------------ outputs and reports


@pytest.mark.parametrize("out", ["/proc/trust-fast-out", "/proc/trust-fast-out/deeper"])
def test_an_out_where_nothing_can_be_created_names_that_directory(capsys, tmp_path, out):
    """/proc exists but takes no new entry (ENOENT): the line must not read as if /proc were missing."""
    refused(capsys, tmp_path, [*GEN, "--out", out],
            f"--out {out!r} is not writable (cannot create entries in '/proc': it takes no new files)")


def test_reports_write_null_for_every_non_finite_number(tmp_path):
    from trust_fast.io import write_json_atomic

    path = tmp_path / "r.json"
    write_json_atomic({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": (float("-inf"),)}}, str(path))
    got = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in a JSON report"))
    assert got == {"a": None, "b": [None, 1.5], "c": {"d": [None]}}
