"""The README's "TRUST inside your own diffusers training loop" snippet runs as written."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- snippet: diffusers-loop -->"


def snippet() -> str:
    for name in ("README.md",):
        path = os.path.join(ROOT, name)
        if os.path.isfile(path):
            text = open(path, encoding="utf-8").read()
            if MARKER in text:
                return re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.S).group(1)
    raise AssertionError(f"no README holds the marker {MARKER}")


def test_readme_snippet_runs_in_a_diffusers_loop(tmp_path, monkeypatch):
    code = snippet()
    added = [ln for ln in code.splitlines() if ln.rstrip().endswith("# TRUST")]
    assert 0 < len(added) <= 10
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README snippet", "exec"), scope)
    trust = scope["trust"]
    assert trust.step_count == 10 and scope["stats"]["selected_rows"] > 0
    assert os.path.isfile(tmp_path / "shapes-without-red" / "model_index.json")
