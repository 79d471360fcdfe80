"""Property test of checkpoint loading (#32): a good checkpoint, damaged one field at a time
(deleted, of another type, out of range, a NaN or Inf in a tensor, a tensor of another shape or of
a dtype trust_fast never stores), is refused by ``trust-fast unlearn --resume``: exit 2, one line
naming the file, no traceback, nothing written and nothing changed.

Every mutation drawn here is invalid by construction (see each strategy), so the test never has
to accept either outcome.
"""
import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import refused, tiny_args
from trust_fast.cli import main

ARGS = ["unlearn", "--concept", "red", *tiny_args(), "--no-eval", "--checkpoint-every", "1"]
STEPS = 2
# top-level fields every checkpoint holds (the others may be None: e.g. no pools means "sample them")
REQUIRED = ("format", "concept", "config", "names", "base_digest", "params", "optimizer", "step_count",
            "skipped_steps", "seconds", "pool_seconds", "history", "generator", "torch_rng")
# validated tensors whose values must be finite
FINITE = ("params.", "hutchinson.diags.", "pools.", "adversary.prefixes.", "adversary.emb_forget.")
FINITE_STATE = ("exp_avg", "exp_avg_sq", "step")
FIXED_STATE = ("exp_avg", "exp_avg_sq", "slot_of_row", "row_of_slot")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    assert main([*ARGS, "--checkpoint-dir", str(root / "ckpt"), "--steps", str(STEPS), "--out", str(root / "o")]) == 0
    state = torch.load(root / "ckpt" / "checkpoint.pt", weights_only=True)
    assert state["adversary"] is not None and state["hutchinson"] is not None and state["pools"] is not None
    return state


def _tensors(node, prefix: str = ""):
    """(dotted path, tensor) of every tensor under `node`."""
    if isinstance(node, torch.Tensor):
        yield prefix.rstrip("."), node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _tensors(v, f"{prefix}{k}.")
    elif isinstance(node, (list, tuple)):
        for k, v in enumerate(node):
            yield from _tensors(v, f"{prefix}{k}.")


def _state_field(path: str, names) -> bool:
    """An optimizer state entry (MaskedAdamW's optimizer.state.K.NAME, or an adversary's Adam)."""
    return ".state." in f".{path}" and path.rsplit(".", 1)[-1] in names


def _paths(state: dict) -> tuple[list[str], list[str]]:
    """(floating tensors that must be finite, tensors whose shape is fixed by the run)."""
    finite, fixed = [], []
    for path, t in _tensors(state):
        if path.startswith("history") or t.dim() == 0 or t.shape[0] == 0:  # a slot table of a param never selected
            continue
        if t.is_floating_point() and (path.startswith(FINITE) or _state_field(path, FINITE_STATE)):
            finite.append(path)
        if (path.startswith((*FINITE, "generator", "torch_rng")) or _state_field(path, (*FIXED_STATE, "step"))):
            fixed.append(path)
    return finite, fixed


def _get(state, path: str):
    node = state
    for key in path.split("."):
        node = node[int(key)] if isinstance(node, list) else node[int(key) if key.isdigit() and int(key) in node else key]
    return node


def _set(state, path: str, value) -> None:
    *parents, last = path.split(".")
    node = _get(state, ".".join(parents)) if parents else state
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[int(last) if last.isdigit() and int(last) in node else last] = value


def _same_kind(a, b) -> bool:
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return (number(a) and number(b)) or type(a) is type(b)


ANY = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                st.text(max_size=8), st.lists(st.integers(), max_size=3),
                st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def mutations(draw, state: dict):
    """(description, mutated state), always invalid."""
    finite, fixed = _paths(state)
    kind = draw(st.sampled_from(["delete", "retype", "range", "poison", "reshape", "dtype"]))
    s = copy.copy(state)
    if kind == "delete":
        key = draw(st.sampled_from(REQUIRED))
        del s[key]
        return f"delete {key}", s
    if kind == "retype":
        key = draw(st.sampled_from(REQUIRED))
        value = draw(ANY.filter(lambda v: not _same_kind(v, state[key])))
        s[key] = value
        return f"{key} = {value!r}", s
    if kind == "range":
        key = draw(st.sampled_from(["step_count", "skipped_steps", "seconds", "pool_seconds"]))
        if key == "step_count":
            value = draw(st.integers(-2**40, 2**40).filter(lambda v: v != STEPS))
        elif key == "skipped_steps":
            value = draw(st.one_of(st.integers(-2**40, -1), st.integers(STEPS + 1, 2**40)))
        else:
            value = draw(st.one_of(st.floats(max_value=-1e-9), st.sampled_from([math.nan, math.inf])))
        s[key] = value
        return f"{key} = {value!r}", s
    s = copy.deepcopy(state)
    path = draw(st.sampled_from(finite if kind == "poison" else fixed))
    t = _get(s, path)
    if kind == "poison":
        t = t.clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    elif kind == "reshape":
        t = torch.cat([t, t[:1]])
    else:
        t = t.to(draw(st.sampled_from([torch.complex64, torch.float8_e4m3fn])))
    _set(s, path, t)
    return f"{kind} {path}", s


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_checkpoint_damaged_in_any_field_is_refused_in_one_line(capsys, tmp_path_factory, good, data):
    what, damaged = data.draw(mutations(good))
    root = tmp_path_factory.mktemp("case")
    (root / "ckpt").mkdir()
    torch.save(damaged, root / "ckpt" / "checkpoint.pt")
    err = refused(capsys, root, [*ARGS, "--resume", str(root / "ckpt"), "--steps", str(STEPS + 2),
                                 "--out", str(root / "out")], "checkpoint")
    assert "checkpoint.pt" in err, (what, err)
