"""What a run records: its steps (counts, skips by reason, timings, history) and the report and
verdicts made from them (diverged, unchanged)."""
from __future__ import annotations

from dataclasses import dataclass, field

# why a step was skipped (report()["skipped_by_reason"]); a skipped step changes no weight and no state
SKIP_NO_FORGET = "no forget examples in the batch"
SKIP_NON_FINITE = "non-finite loss or gradient"
SKIP_OVERFLOW = "float16 overflow (loss scale lowered)"
SKIP_WEIGHTS = "non-finite weights after the update (rolled back)"
SKIP_UNKNOWN = "unknown (resumed from a checkpoint written before skip reasons were saved)"
# skips that mean the run is diverging, not that a loss scale is settling
DIVERGING = (SKIP_NON_FINITE, SKIP_WEIGHTS)


@dataclass
class History:
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


class RunRecord:
    """Step count, skipped steps (by reason), seconds and history of a run."""

    def __init__(self):
        self.step_count = 0
        self.skipped_steps = 0
        self.skipped_by_reason: dict[str, int] = {}
        self.seconds = 0.0
        self.history = History()
        self.failed_checkpoints: list[int] = []  # steps whose checkpoint could not be written

    def skipped(self, reason: str) -> None:
        self.skipped_steps += 1
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1

    def mean_selected_rows(self) -> float:
        h = self.history.steps
        return sum(s["selected_rows"] for s in h) / len(h) if h else 0.0

    def diverged(self, lr: float) -> str | None:
        """Why the run's weights must not be saved, or None: more than half of its steps were skipped
        for non-finite losses, gradients or weights (an lr too large, a poisoned batch source)."""
        bad = sum(self.skipped_by_reason.get(r, 0) for r in DIVERGING)
        if self.step_count and 2 * bad > self.step_count:
            return (f"the run diverged: {bad} of its {self.step_count} steps were skipped for non-finite values "
                    f"({', '.join(f'{r}: {n}' for r, n in self.skipped_by_reason.items())}); lower lr "
                    f"(now {lr:g})")
        return None

    def why_unchanged(self, finalized: dict | None, xi: float) -> str:
        """Why a run that changed no weight did not (it ran; the caller found no changed weight)."""
        fin = finalized or {}
        if self.skipped_steps == self.step_count:
            return f"every one of its {self.step_count} steps was skipped ({', '.join(self.skipped_by_reason)})"
        if not any(s.get("selected_rows") for s in self.history.steps) and self.history.steps:
            return (f"no row was selected at any of its {len(self.history.steps)} steps (xi={xi:g} is above "
                    "every saliency z-score: lower xi)")
        if fin.get("rows_ever_updated") and not fin.get("rows_kept"):
            return (f"no row was updated {fin['min_row_updates']} times, so finalize returned every row to its "
                    "original weights: run more steps or lower min_row_updates")
        return "no weight differs from the original model"

    # ------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "skipped_steps": self.skipped_steps,
                "skipped_by_reason": dict(self.skipped_by_reason), "seconds": self.seconds,
                "history": {"steps": self.history.steps, "evals": self.history.evals}}

    @staticmethod
    def check_state(f, state: dict) -> None:
        """skipped_by_reason (written since #33): counts of known reasons adding up to skipped_steps."""
        reasons = f.of_type(state.get("skipped_by_reason"), "skipped_by_reason", dict, none=True)
        if reasons is None:
            return
        known = (SKIP_NO_FORGET, SKIP_NON_FINITE, SKIP_OVERFLOW, SKIP_WEIGHTS, SKIP_UNKNOWN)
        for reason, n in reasons.items():
            if reason not in known:
                f.damaged("'skipped_by_reason'", f"names {reason!r}, which is no reason a step is skipped for")
            f.count(n, f"skipped_by_reason[{reason!r}]", 0, state["skipped_steps"])
        if sum(reasons.values()) != state["skipped_steps"]:
            f.damaged("'skipped_by_reason'", f"adds up to {sum(reasons.values())}, not skipped_steps "
                      f"{state['skipped_steps']}")

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        self.skipped_steps = state["skipped_steps"]
        # a checkpoint from before skip reasons were kept: its skips' reasons are unknown
        self.skipped_by_reason = dict(state.get("skipped_by_reason") or
                                      ({SKIP_UNKNOWN: self.skipped_steps} if self.skipped_steps else {}))
        self.seconds = state["seconds"]
        self.history.steps, self.history.evals = state["history"]["steps"], state["history"]["evals"]
