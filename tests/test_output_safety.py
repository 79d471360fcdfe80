"""Nothing a user owns is lost: every writer claims its output through trust_fast.io.claim_output.

Each refusal is checked the same way: exit code 2 (CLI) or OutputError (API), one line naming the
problem, no traceback, and every file that existed before is byte-identical afterwards (the whole
sandbox, the source model included, is hashed before and after).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from helpers import refused, snapshot, tiny_config  # (test_bad_input*.py import the first two from here)
from trust_fast.cli import main
from trust_fast.io import MARKER, OutputError, claim_output
from trust_fast.world import model_path


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A user's working directory: a copy of the built-in model, a folder of notes, a previous output."""
    shutil.copytree(model_path("shapes"), tmp_path / "model")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("my notes\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


GEN = ["generate", "--prompt", "a red circle", "--n", "1", "--steps", "2"]


# ---------------------------------------------------------------------------------- the rules

@pytest.mark.parametrize("out,message", [
    ("notes", "is not empty and was not written by trust_fast"),
    (".", "contains the model directory"),
    ("", "--out is empty"),
    ("model", "is the model directory itself"),
    ("model/unet", "lies inside the model directory"),
    ("notes/notes.txt", "exists and is not a directory"),
])
def test_unlearn_never_writes_into_what_the_user_owns(capsys, sandbox, out, message):
    refused(capsys, sandbox, ["unlearn", "--model", "model", "--concept", "red", "--steps", "1", "--no-eval",
                              "--out", out], message)


def test_out_that_contains_the_model_is_refused(capsys, sandbox):
    (sandbox / "work").mkdir()
    shutil.move(str(sandbox / "model"), str(sandbox / "work" / "model"))
    refused(capsys, sandbox, ["unlearn", "--model", "work/model", "--concept", "red", "--no-eval", "--out", "work",
                              "--overwrite"], "contains the model directory")


def test_checkpoint_dir_inside_out_is_refused(capsys, sandbox):
    refused(capsys, sandbox, ["unlearn", "--concept", "red", "--no-eval", "--out", "run", "--checkpoint-every", "1",
                              "--checkpoint-dir", "run/ckpt"], "lies inside the --out directory")
    refused(capsys, sandbox, ["unlearn", "--concept", "red", "--no-eval", "--out", "run/sub", "--checkpoint-every",
                              "1", "--checkpoint-dir", "run"], "contains the --out directory")


def test_apply_patch_with_empty_out_is_refused(capsys, sandbox):
    refused(capsys, sandbox, ["apply-patch", "--base", "shapes", "--patch", _patch(sandbox), "--out", ""], "--out is empty")


def test_export_patch_never_overwrites_the_base_weights(capsys, sandbox):
    weights = "model/unet/diffusion_pytorch_model.safetensors"
    refused(capsys, sandbox, ["export-patch", "--base", "model", "--unlearned", "model", "--out", weights,
                              "--overwrite"], "lies inside the base model directory")


def test_generate_evaluate_and_world_train_refuse_foreign_outputs(capsys, sandbox):
    refused(capsys, sandbox, [*GEN, "--out", "notes"], "was not written by trust_fast")
    refused(capsys, sandbox, [*GEN, "--out", "notes", "--overwrite"], "was not written by trust_fast")
    refused(capsys, sandbox, ["evaluate", "--concept", "red", "--out", "notes/notes.txt", "--overwrite"],
            "exists and was not written by trust_fast")
    refused(capsys, sandbox, ["evaluate", "--concept", "red", "--out", "notes/notes.txt"], "pass --overwrite")
    refused(capsys, sandbox, ["evaluate", "--concept", "red", "--grids", "notes"], "was not written by trust_fast")
    assets = os.path.dirname(model_path("shapes"))  # the shipped weights stay byte-identical too
    refused(capsys, assets, ["world", "train", "--out", assets, "--overwrite"],
            "contains the built-in model directory")
    refused(capsys, sandbox, ["demo", "--out", "notes", "--overwrite"], "was not written by trust_fast")


def test_a_previous_output_is_replaced_only_with_overwrite_and_only_if_all_ours(capsys, sandbox):
    assert main([*GEN, "--out", "gen"]) == 0
    marker = json.loads((sandbox / "gen" / MARKER).read_text())
    assert marker["written_by"] == "trust_fast" and marker["files"] == ["000.png", "grid.png"]
    refused(capsys, sandbox, [*GEN, "--out", "gen"], "holds an earlier trust_fast output; pass --overwrite")
    first = snapshot(sandbox / "gen")
    assert main([*GEN, "--seed", "1", "--out", "gen", "--overwrite"]) == 0
    assert snapshot(sandbox / "gen") != first and sorted(os.listdir(sandbox)) == ["gen", "model", "notes"]
    (sandbox / "gen" / "mine.txt").write_text("added by the user")
    refused(capsys, sandbox, [*GEN, "--out", "gen", "--overwrite"], "holds files trust_fast did not write (mine.txt)")


def test_api_save_follows_the_same_rules(sandbox):
    from trust_fast import TrustUnlearner
    from trust_fast.world import load_pipeline

    u = TrustUnlearner(load_pipeline("model", "cpu"), "red", tiny_config(batch=None, steps=1))
    before = snapshot(sandbox)
    for out, message in (("notes", "was not written by trust_fast"), ("model", "is the source model itself"),
                         ("model/unet", "lies inside the source model")):
        with pytest.raises(OutputError, match=message):
            u.save(out)
    assert snapshot(sandbox) == before
    u.save("saved")
    with pytest.raises(OutputError, match="pass --overwrite"):
        u.save("saved")
    u.save("saved", overwrite=True)
    assert (sandbox / "saved" / "model_index.json").is_file() and (sandbox / "saved" / MARKER).is_file()


def test_a_failed_write_leaves_the_previous_output_and_no_leftovers(sandbox):
    os.makedirs("prev")
    with claim_output("prev", "--out") as out:
        open(os.path.join(out.path, "a.txt"), "w").write("first")
    before = snapshot(sandbox)
    with pytest.raises(OSError, match="No space left"):
        with claim_output("prev", "--out", overwrite=True) as out:
            open(os.path.join(out.path, "a.txt"), "w").write("second, half")
            raise OSError(28, "No space left on device")
    assert snapshot(sandbox) == before


def test_disk_full_during_save_is_one_line_and_keeps_nothing_half_written(capsys, sandbox, monkeypatch):
    import diffusers

    def full(self, *a, **k):
        raise OSError(28, "No space left on device", "model/unet/diffusion_pytorch_model.safetensors")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "save_pretrained", full)
    refused(capsys, sandbox, ["apply-patch", "--base", "model", "--patch", _patch(sandbox), "--out", "patched"],
            "No space left on device")


def _patch(sandbox) -> str:
    """A valid patch of `sandbox/model`: one changed UNet row."""
    import torch

    from trust_fast.io import save_file_atomic
    from trust_fast.patch import make_patch
    from trust_fast.world import load_pipeline

    base, new = load_pipeline(str(sandbox / "model"), "cpu"), load_pipeline(str(sandbox / "model"), "cpu")
    with torch.no_grad():
        new.unet.conv_in.weight[1] += 1.0
    tensors, meta = make_patch(base, new)
    path = str(sandbox / "valid.safetensors")
    save_file_atomic(tensors, path, metadata=meta)
    return path


# -------------------------------------------------------------------------- lock, kills, signals

HOLD = textwrap.dedent("""
    import sys
    from trust_fast.io import claim_output
    with claim_output(sys.argv[1], "--out") as out:
        print("claimed", flush=True)
        sys.stdin.readline()
        open(out.path + "/a.txt", "w").write("winner")
""")


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(capsys, sandbox):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, "gen"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        refused(capsys, sandbox, [*GEN, "--out", "gen"], "is being written by another trust-fast run")
        refused(capsys, sandbox, [*GEN, "--out", "gen", "--overwrite"], "is being written by another trust-fast run")
    finally:
        holder.communicate("go\n", timeout=60)
    assert holder.returncode == 0 and (sandbox / "gen" / "a.txt").read_text() == "winner"
    assert sorted(os.listdir(sandbox)) == ["gen", "model", "notes"]  # no lock file, no staging left


def test_two_concurrent_writers_exactly_one_wins(sandbox):
    cmd = [sys.executable, "-m", "trust_fast.cli", *GEN, "--out", "gen"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert len(loser.strip().splitlines()) == 1 and ("another trust-fast run" in loser or "earlier trust_fast" in loser)
    assert sorted(os.listdir(sandbox)) == ["gen", "model", "notes"]


KILL_IN_SWAP = textwrap.dedent("""
    import os, signal, sys
    from trust_fast import io
    real = os.replace
    def replace(a, b):
        real(a, b)
        if b.endswith(io.OLD_TAG):  # the previous output was moved aside: die before the new one lands
            os.kill(os.getpid(), signal.SIGKILL)
    io.os.replace = replace
    with io.claim_output(sys.argv[1], "--out", overwrite=True) as out:
        open(os.path.join(out.path, "a.txt"), "w").write("new")
""")


def test_a_kill_in_the_rename_window_loses_nothing(capsys, sandbox):
    with claim_output("out", "--out") as out:
        open(os.path.join(out.path, "a.txt"), "w").write("old")
    kill = subprocess.run([sys.executable, "-c", KILL_IN_SWAP, "out"], capture_output=True, text=True, timeout=120)
    assert kill.returncode == -signal.SIGKILL
    assert not (sandbox / "out").exists()  # the window: the old result only under its backup name
    assert (sandbox / ".out.trust-fast-old" / "a.txt").read_text() == "old"
    # the next claim of the path restores the previous result, says so, and removes the partial new one
    assert main([*GEN, "--out", "out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "a partial output of an interrupted run" in err[0], err
    assert err[1].startswith("trust-fast: note: restored --out") and "was interrupted while replacing it" in err[1]
    assert err[2].startswith("trust-fast: error: ") and "holds an earlier trust_fast output" in err[2]
    assert (sandbox / "out" / "a.txt").read_text() == "old"
    assert sorted(os.listdir(sandbox)) == ["model", "notes", "out"]


def test_a_kill_while_writing_leaves_the_previous_output_and_is_cleaned_next_time(capsys, sandbox):
    script = HOLD.replace('print("claimed", flush=True)\n    sys.stdin.readline()',
                          'open(out.path + "/half.txt", "w").write("x"); print("claimed", flush=True); '
                          'sys.stdin.readline()')
    proc = subprocess.Popen([sys.executable, "-c", script, "gen"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "claimed"
    proc.kill()
    proc.wait(timeout=60)
    leftovers = [e for e in os.listdir(sandbox) if e.startswith(".gen.trust-fast-tmp-")]
    assert len(leftovers) == 1 and not (sandbox / "gen").exists()
    assert main([*GEN, "--out", "gen"]) == 0
    err = capsys.readouterr().err
    assert f"note: removed {str(sandbox / leftovers[0])!r}, a partial output of an interrupted run" in err
    assert sorted(os.listdir(sandbox)) == ["gen", "model", "notes"]


def test_sigterm_is_handled_like_sigint(sandbox):
    """A SIGTERM while the model is being unlearned: exit 143, one line, no output, no staging left."""
    proc = subprocess.Popen([sys.executable, "-m", "trust_fast.cli", "unlearn", "--concept", "red", "--steps", "500",
                             "--no-eval", "--out", "run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time

    deadline = time.time() + 120
    while not any(e.startswith(".run.trust-fast-tmp-") for e in os.listdir(sandbox)) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # inside the run
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "trust-fast: terminated; unfinished outputs were removed"
    assert sorted(os.listdir(sandbox)) == ["model", "notes"]
