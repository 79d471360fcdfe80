"""Optional TensorBoard logging of an unlearning run (``trust-fast unlearn --log-dir DIR``).

Uses the standard ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package:
``pip install tensorboard``). Every numeric entry of a step's stats goes under ``step/<name>``
(losses, selected rows, phase times), every evaluation's under ``eval/<name>`` (UA, retain
accuracy); the x axis is the step. The writer only adds new event files to the directory.
"""
from __future__ import annotations

import math
import numbers


def tensorboard_missing() -> str | None:
    """None if TensorBoard logging can run here, else one line saying what to install."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return "--log-dir needs the tensorboard package (pip install tensorboard)"
    return None


class TensorBoardLog:
    """A ``log_fn`` for :meth:`trust_fast.engine.TrustUnlearner.run`; close() flushes the events."""

    def __init__(self, log_dir: str, comment: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)
        if comment:
            self.writer.add_text("run", "  \n".join(f"{k}: {v}" for k, v in comment.items()), 0)

    def __call__(self, kind: str, step: int, values: dict) -> None:
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                continue
            if name == "step":
                continue
            self.writer.add_scalar(f"{kind}/{name}", float(value), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["TensorBoardLog", "tensorboard_missing"]
