"""Checkpoint and resume: a `trust-fast unlearn` killed by SIGKILL mid-run and resumed ends with the
same weights, bit for bit, as an uninterrupted run."""
import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import small, tiny_args
from trust_fast import TrustConfig, TrustUnlearner
from trust_fast.checkpoint import load_checkpoint, save_checkpoint

STEPS = 8
ARGS = ["unlearn", "--concept", "red", "--steps", str(STEPS), *tiny_args(), "--no-eval", "--seed", "3"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trust_fast.cli", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _unet(out) -> dict:
    return load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights(tmp_path):
    full, part, ckpt = tmp_path / "full", tmp_path / "part", tmp_path / "ckpt"
    uninterrupted = _cli(*ARGS, "--out", str(full))
    victim = _cli(*ARGS, "--out", str(part), "--checkpoint-every", "2", "--checkpoint-dir", str(ckpt))
    deadline = time.monotonic() + 240
    while not (ckpt / "checkpoint.pt").exists():
        assert victim.poll() is None, victim.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not part.exists()  # killed before the end: no half-written output
    killed_at = torch.load(ckpt / "checkpoint.pt", weights_only=True)["step_count"]
    assert 2 <= killed_at < STEPS

    resumed = _cli(*ARGS, "--out", str(part), "--resume", str(ckpt), "--checkpoint-every", "2")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert f"resuming from step {killed_at}" in out
    out_full, err_full = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err_full[-2000:]

    a, b = _unet(full), _unet(part)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    from trust_fast.world import load_pipeline

    base = load_pipeline("shapes", "cpu").unet.state_dict()
    changed = sum(not torch.equal(base[n], a[n]) for n in a)
    assert changed > 0  # the run did edit the model
    report = json.loads((part / "report.json").read_text())
    assert report["steps"] == STEPS and len(report["history"]) == STEPS and report["skipped_steps"] == 0


SMALL = small(diag_interval=2, steps=4)


def test_checkpoint_refuses_another_config_concept_or_base(untrained_world, tmp_path):
    u = TrustUnlearner(copy.deepcopy(untrained_world), "red", TrustConfig(**SMALL))
    u.step()
    path = save_checkpoint(u, str(tmp_path / "good"))
    state = torch.load(path, weights_only=True)
    weights = [p.detach().clone() for p in u.params]
    for name, change, message in (("config", {"config": {**state["config"], "xi": 1.5}}, "another config.*xi"),
                                  ("concept", {"concept": "blue"}, "unlearns 'blue', not 'red'"),
                                  ("base", {"base_digest": "0" * 64}, "another base model")):
        (tmp_path / name).mkdir()
        torch.save({**state, **change}, tmp_path / name / "checkpoint.pt")
        with pytest.raises(ValueError, match=message):
            load_checkpoint(u, str(tmp_path / name))
    with pytest.raises(ValueError, match="no checkpoint"):
        load_checkpoint(u, str(tmp_path / "none"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="damaged"):
        load_checkpoint(u, str(tmp_path / "bad"))
    assert all(torch.equal(p, w) for p, w in zip(u.params, weights))  # refusals change nothing
    assert load_checkpoint(u, str(tmp_path / "good")) == 1


def test_a_checkpoint_from_before_a_field_reads_as_what_the_code_did_then(untrained_world, tmp_path, monkeypatch):
    """x0_retain_per_prompt came later: a checkpoint without it cached retain images like the
    forget ones (None), whatever today's default, so only a run configured that way resumes it."""
    u = TrustUnlearner(copy.deepcopy(untrained_world), "red", TrustConfig(**SMALL))
    u.step()
    state = torch.load(save_checkpoint(u, str(tmp_path / "now")), weights_only=True)
    old = {k: v for k, v in state["config"].items() if k != "x0_retain_per_prompt"}
    (tmp_path / "old").mkdir()
    # without its image cache, whose shape would tell the real count apart from the patched one below
    torch.save({**state, "config": old, "pools": None}, tmp_path / "old" / "checkpoint.pt")
    other = TrustUnlearner(copy.deepcopy(untrained_world), "red", TrustConfig(**SMALL, x0_retain_per_prompt=2))
    with pytest.raises(ValueError, match=r"another config.*x0_retain_per_prompt"):
        load_checkpoint(other, str(tmp_path / "old"))
    assert load_checkpoint(u, str(tmp_path / "old")) == 1
    # None is "as x0_per_prompt": a run that spells that number out resumes it too
    same = TrustUnlearner(copy.deepcopy(untrained_world), "red", TrustConfig(**SMALL, x0_retain_per_prompt=1))
    assert load_checkpoint(same, str(tmp_path / "old")) == 1
    # the missing field reads as what the code did before it, not as today's default
    monkeypatch.setattr("trust_fast.config.PREDATED_FIELDS", {"x0_retain_per_prompt": 2})
    assert load_checkpoint(other, str(tmp_path / "old")) == 1
    with pytest.raises(ValueError, match=r"another config.*x0_retain_per_prompt"):
        load_checkpoint(u, str(tmp_path / "old"))
