"""What several test files share that is not a fixture (fixtures live in conftest.py): the one
tiny-run config, and the checks that a refused command changed nothing."""
from __future__ import annotations

import hashlib
import os

TESTS = os.path.dirname(os.path.abspath(__file__))  # tests/: helpers, conftest and tiny_pipelines live here
REPO = os.path.dirname(TESTS)  # the repository's root: README.md, benchmarks/, scripts/, trust_fast/

# The TrustConfig fields of a tiny run: one data-free image per prompt made in two sampling steps,
# batches of four. Tests add the fields they are about (steps, hessian, diag_interval, ...).
SMALL = dict(x0_per_prompt=1, x0_steps=2, batch_size=4, retain_batch_size=4)


def small(batch: int | None = 4, **overrides) -> dict:
    """SMALL with forget and retain batches of `batch` rows (None: TrustConfig's default batch
    sizes), and `overrides` on top: a dict for TrustConfig(**...), methods.config(method, **...)
    or TrustConfig.replace(**...)."""
    out = {k: v for k, v in SMALL.items() if not k.endswith("batch_size")}
    if batch is not None:
        out.update(batch_size=batch, retain_batch_size=batch)
    return {**out, **overrides}


def tiny_config(method: str = "trust", batch: int | None = 4, **overrides):
    """The config of `method` for a tiny run: TrustConfig(**small(batch, **overrides)) for "trust",
    methods.config(method, **small(batch, **overrides)) for the others ("salun", "esd")."""
    from trust_fast import TrustConfig, methods

    kw = small(batch, **overrides)
    return TrustConfig(**kw) if method == "trust" else methods.config(method, **kw)


def tiny_args(batch: int | None = 4) -> list[str]:
    """SMALL as `trust-fast unlearn` flags (`batch` None: the CLI's default batch size)."""
    args = ["--x0-per-prompt", str(SMALL["x0_per_prompt"]), "--x0-steps", str(SMALL["x0_steps"])]
    return args + ([] if batch is None else ["--batch-size", str(batch)])


def snapshot(root) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path (directories included as entries)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def refused(capsys, root, args: list[str], message: str) -> str:
    """`trust-fast ARGS` is refused: exit code 2, one line naming `message`, no traceback, and
    every file under `root` byte-identical afterwards. Returns the line."""
    from trust_fast.cli import main

    before = snapshot(root)
    capsys.readouterr()  # what earlier commands printed
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("trust-fast: error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert "Traceback" not in err
    assert snapshot(root) == before, "a refused command changed files"
    return err


def moved_rows(module, before: dict, selected: set) -> int:
    """The rows of `module`'s parameters that differ from `before` (name -> tensor), each checked to
    be one a step selected (`selected`: (module name, row) pairs); returns how many moved."""
    moved = 0
    for n, p in module.named_parameters():
        diff = p.detach() != before[n]
        if diff.any():
            rows = diff.reshape(diff.shape[0], -1).any(1).nonzero().flatten().tolist()
            assert {(n.rsplit(".", 1)[0], r) for r in rows} <= selected, n
            moved += len(rows)
    return moved
