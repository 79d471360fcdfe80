"""Every mutant of scripts/mutants.py still applies: its code occurs exactly once in its file, and
the tests named to kill it exist. A mutant whose code moved would otherwise be reported only when
someone runs the (11-minute) mutation check."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
from helpers import REPO

ROOT = REPO
_spec = importlib.util.spec_from_file_location("mutants", os.path.join(ROOT, "scripts", "mutants.py"))
mutants = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("mutants", mutants)  # its dataclasses look their module up
_spec.loader.exec_module(mutants)


@pytest.mark.parametrize("m", mutants.MUTANTS, ids=lambda m: m.name)
def test_the_mutant_applies_and_names_existing_tests(m):
    with open(os.path.join(ROOT, m.file), encoding="utf-8") as f:
        assert f.read().count(m.old) == 1, f"{m.name}: its code no longer occurs exactly once in {m.file}"
    for test in m.tests:
        path, _, name = test.partition("::")
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            assert f"def {name.split('[')[0]}(" in f.read(), f"{m.name}: {test} does not exist"
