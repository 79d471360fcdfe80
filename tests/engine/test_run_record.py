"""The run's record survives a checkpoint: skip counts by reason are saved, checked and restored
(they were lost on resume before #33), and a checkpoint from before they were saved resumes with
its skips counted under an unknown reason that a later checkpoint can carry."""
from __future__ import annotations

import pytest

from trust_fast.checkpoint import Fields
from trust_fast.engine.report import SKIP_NON_FINITE, SKIP_OVERFLOW, SKIP_UNKNOWN, RunRecord


def _record(*reasons: str) -> RunRecord:
    r = RunRecord()
    r.step_count = 5
    for why in reasons:
        r.skipped(why)
    return r


def test_skip_reasons_round_trip():
    state = _record(SKIP_OVERFLOW, SKIP_OVERFLOW, SKIP_NON_FINITE).state_dict()
    RunRecord.check_state(Fields("ck.pt"), state)
    again = RunRecord()
    again.load_state_dict(state)
    assert again.skipped_steps == 3 and again.skipped_by_reason == {SKIP_OVERFLOW: 2, SKIP_NON_FINITE: 1}


def test_an_older_checkpoint_resumes_with_unknown_reasons_and_saves_them_again():
    state = _record(SKIP_OVERFLOW).state_dict()
    del state["skipped_by_reason"]
    resumed = RunRecord()
    resumed.load_state_dict(state)
    assert resumed.skipped_by_reason == {SKIP_UNKNOWN: 1}
    RunRecord.check_state(Fields("ck.pt"), resumed.state_dict())  # its own next checkpoint is accepted


@pytest.mark.parametrize("reasons, problem", [({"made up": 1}, "no reason a step is skipped for"),
                                               ({SKIP_OVERFLOW: 1, SKIP_NON_FINITE: 1}, "adds up to 2, not skipped_steps 1"),
                                               ({SKIP_OVERFLOW: -1}, "expected 0 <=")])
def test_damaged_skip_reasons_are_refused(reasons, problem):
    state = {**_record(SKIP_OVERFLOW).state_dict(), "skipped_by_reason": reasons}
    with pytest.raises(ValueError, match="checkpoint 'ck.pt' is damaged") as e:
        RunRecord.check_state(Fields("ck.pt"), state)
    assert problem in str(e.value)
