"""--log-dir: step stats and evaluations reach TensorBoard event files; bad directories are refused."""
from __future__ import annotations

import pytest

from helpers import tiny_args
from trust_fast.cli import main

pytest.importorskip("tensorboard")  # a test extra: CI installs it


def _scalars(log_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_unlearn_logs_every_step_and_every_evaluation(tmp_path):
    logs = tmp_path / "logs"
    assert main(["unlearn", "--concept", "red", "--steps", "3", "--eval-every", "2", "--n-per-prompt", "1",
                 *tiny_args(batch=None), "--out", str(tmp_path / "out"),
                 "--log-dir", str(logs)]) == 0
    tags = _scalars(logs)
    assert [s for s, _ in tags["step/loss_forget"]] == [1, 2, 3]
    assert [s for s, _ in tags["step/selected_rows"]] == [1, 2, 3] and all(v > 0 for _, v in tags["step/selected_rows"])
    assert [s for s, _ in tags["eval/ua"]] == [2, 3] and "eval/retain_acc" in tags
    assert any(t.startswith("step/time_") for t in tags)


def test_bad_log_dirs_are_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["unlearn", "--concept", "red", "--out", str(tmp_path / "out"), "--log-dir", str(blocker)]) == 2
    assert "--log-dir" in capsys.readouterr().err and blocker.read_text() == "x"
    out = tmp_path / "out"
    assert main(["unlearn", "--concept", "red", "--out", str(out), "--log-dir", str(out / "logs")]) == 2
    assert "inside the --out directory" in capsys.readouterr().err and not out.exists()


def test_a_missing_tensorboard_is_one_line(tmp_path, capsys, monkeypatch):
    import trust_fast.tblog as tblog

    monkeypatch.setattr(tblog, "tensorboard_missing", lambda: "--log-dir needs the tensorboard package (pip ...)")
    assert main(["unlearn", "--concept", "red", "--out", str(tmp_path / "o"), "--log-dir", str(tmp_path / "l")]) == 2
    err = capsys.readouterr().err
    assert "needs the tensorboard package" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "l").exists()
