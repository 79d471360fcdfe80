"""The README's Python snippets run as written: "TRUST inside your own diffusers training loop"
and "Only the drop-in pieces"."""
import pytest
import os
import re

import torch
from helpers import REPO

ROOT = REPO


def snippet(name: str) -> str:
    marker = f"<!-- snippet: {name} -->"
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert marker in text, f"README.md holds no marker {marker}"
    return re.search(r"```python\n(.*?)```", text[text.index(marker):], re.S).group(1)


def run(name: str) -> dict:
    code = snippet(name)
    added = [ln for ln in code.splitlines() if ln.rstrip().endswith("# TRUST") or "# TRUST " in ln]
    assert 0 < len(added) <= 10, added
    scope: dict = {}
    exec(compile(code, f"README snippet {name}", "exec"), scope)
    return scope


@pytest.mark.slow
def test_readme_snippet_runs_in_a_diffusers_loop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = run("diffusers-loop")
    trust = scope["trust"]
    assert trust.step_count == 10 and scope["stats"]["selected_rows"] > 0
    assert os.path.isfile(tmp_path / "shapes-without-red" / "model_index.json")


def test_readme_drop_in_snippet_updates_only_selected_rows_of_the_chosen_weights():
    from trust_fast.world import load_pipeline

    scope = run("drop-in")
    unet, weights, optimizer = scope["unet"], scope["weights"], scope["optimizer"]
    original = dict(load_pipeline("shapes", "cpu").unet.named_parameters())
    chosen = {id(w) for w in weights}
    for n, p in unet.named_parameters():
        if id(p) not in chosen:
            assert torch.equal(p.detach(), original[n]), n
    changed = sum(int((p.detach() != original[n]).any(1).sum()) for n, p in unet.named_parameters() if id(p) in chosen)
    total = sum(w.shape[0] for w in weights)
    # the last step's rows, at least, moved; and far from every row (xi = 2 keeps the outliers)
    assert sum(r.numel() for r in scope["rows"]) > 0 and 0 < changed < 0.5 * total
    # optimizer state exists only for rows that were ever selected, never for the whole weight
    assert 0 < optimizer.state_bytes() < 0.5 * sum(w.numel() * 8 for w in weights)
