"""The command-line flags made from TrustConfig's field metadata (trust_fast.cli.config_flags) are
the flags `trust-fast unlearn` always had, each reaching its field; and the metadata they are made
from is complete (every field grouped and explained)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import fields

from trust_fast.cli import build_parser
from trust_fast.cli.unlearn import unlearning_config
from trust_fast.config import _GROUP_CHECKS, GROUPS, TrustConfig
from helpers import REPO

ROOT = REPO
FIELDS = {f.name: f for f in fields(TrustConfig)}
# `trust-fast unlearn`'s TrustConfig flags before they were made from the fields (the 0.1 parser, and those
# added since):
# field -> (argparse type or action, choices, metavar, extra options); every one defaults to None
UNLEARN_FLAGS = {
    "steps": (int, None, None, {}), "hessian": (None, ("hvp", "diag", "none"), None, {}), "lr": (float, None, None, {}),
    "xi": (float, None, None, {}), "max_fraction": (float, None, None, {}), "targets": (None, None, None, {}),
    "alpha": (float, None, None, {}), "lam": (float, None, None, {}), "loc_interval": (int, None, None, {}),
    "retain_neighbors": (float, None, None, {}), "min_row_updates": (int, None, "N", {}),
    "adv_prefix": (int, None, "K", {}), "adv_mode": (None, ("prefix", "tokens"), None, {}),
    "batch_size": (int, None, None, {}), "x0_per_prompt": (int, None, None, {}),
    "x0_retain_per_prompt": (int, None, "N", {}), "x0_steps": (int, None, None, {}),
    "compile_unet": (None, None, "BACKEND", {"nargs": "?", "const": "aot_eager"}),
    "channels_last": ("store_true", None, None, {}), "grad_checkpointing": ("store_true", None, None, {}),
    "hessian_micro_batch": (int, None, "N", {}), "amp": (None, ("auto", "bf16", "fp16", "off"), None, {}),
    # added since (#34)
    "partial_prompts": (None, ("off", "on", "auto"), None, {}), "partial_fraction": (float, None, None, {}),
}
# a command line setting every one of them, and the value each field must get
GIVEN = {"steps": ("7", 7), "hessian": ("hvp", "hvp"), "lr": ("0.5", 0.5), "xi": ("1.5", 1.5),
         "max_fraction": ("0.25", 0.25), "targets": ("*attn2.to_q, ,*ff.net.2", ("*attn2.to_q", "*ff.net.2")),
         "alpha": ("2", 2.0), "lam": ("3", 3.0), "loc_interval": ("2", 2), "retain_neighbors": ("0.25", 0.25),
         "min_row_updates": ("1", 1), "adv_prefix": ("3", 3), "adv_mode": ("tokens", "tokens"),
         "batch_size": ("4", 4), "x0_per_prompt": ("2", 2), "x0_retain_per_prompt": ("1", 1), "x0_steps": ("3", 3),
         "compile_unet": (None, "aot_eager"), "channels_last": (None, True), "grad_checkpointing": (None, True),
         "hessian_micro_batch": ("2", 2), "amp": ("off", "off"), "partial_prompts": ("auto", "auto"),
         "partial_fraction": ("0.5", 0.5)}


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_every_config_flag_of_unlearn_maps_to_its_field():
    actions = {a.dest: a for a in _subparser("unlearn")._actions}
    backed = {name for name in actions if name in FIELDS}
    # --method picks the preset and --seed is every command's; the others are made from the fields
    assert backed == set(UNLEARN_FLAGS) | {"method", "seed"}
    assert (actions["method"].default, actions["seed"].default) == (FIELDS["method"].default, FIELDS["seed"].default)
    for name, (kind, choices, metavar, extra) in UNLEARN_FLAGS.items():
        a, f = actions[name], FIELDS[name]
        assert "flag" in f.metadata, name
        assert a.option_strings == ["--" + name.replace("_", "-")] and a.default is None, name
        assert (isinstance(a, argparse._StoreTrueAction) if kind == "store_true" else a.type is kind), name
        assert (None if a.choices is None else tuple(a.choices)) == choices, name
        assert a.metavar == metavar and all(getattr(a, k) == v for k, v in extra.items()), name
        assert a.help.startswith(f.metadata["help"].replace("%", "%%")), name


def test_every_config_flag_reaches_the_config():
    argv = ["unlearn", "--concept", "red", "--out", "o"]
    for name, (text, _) in GIVEN.items():
        argv += ["--" + name.replace("_", "-")] + ([text] if text is not None else [])
    cfg = unlearning_config(build_parser().parse_args(argv))
    assert {name: getattr(cfg, name) for name in GIVEN} == {name: value for name, (_, value) in GIVEN.items()}


def test_demo_takes_the_steps_of_the_config():
    a = next(a for a in _subparser("demo")._actions if a.dest == "steps")
    assert (a.option_strings, a.type, a.default) == (["--steps"], int, None)


def test_every_field_has_a_group_and_a_help():
    for f in fields(TrustConfig):
        assert f.metadata.get("group") in GROUPS and f.metadata.get("help"), f.name
    assert set(_GROUP_CHECKS) == set(GROUPS)


def test_the_config_spells_the_hessian_modes_as_the_hessian_module_does():
    from trust_fast.hessian import HESSIAN_MODES

    assert FIELDS["hessian"].metadata["choices"] == HESSIAN_MODES


def test_the_config_imports_no_torch():
    """The CLI reads the fields to build its flags, and --help must not wait for torch."""
    r = subprocess.run([sys.executable, "-c", "import sys, trust_fast.config; print('torch' in sys.modules)"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "False", (r.stdout, r.stderr)
