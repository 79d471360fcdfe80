"""benchmarks/compare_methods.py: its method names resolve to valid engine configurations, shared
training runs, pooled rates with intervals, and a tiny end-to-end comparison that resumes."""
import importlib.util
import os
import sys

import pytest
from helpers import REPO

PATH = os.path.join(REPO, "benchmarks", "compare_methods.py")


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_methods", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_compared_method_is_a_valid_configuration(compare):
    from trust_fast.methods import config

    cfgs = {}
    for name in compare.METHODS:
        cfgs[name] = compare.method_config(name)
        cfgs[name].validate()
    lite = cfgs["trust-lite"]
    assert (lite.adv_prefix, lite.x0_per_prompt, lite.x0_steps) == (0, 2, 10)
    default = config("trust")
    assert default.adv_prefix is None  # the adversary wherever the family supports soft prefixes
    # the variant differs in the adversary and the image cache only
    assert lite.replace(adv_prefix=None, x0_per_prompt=default.x0_per_prompt, x0_steps=default.x0_steps) == default
    assert config("salun").adv_prefix == 0 and config("esd").adv_prefix == 0


def test_unknown_method_is_refused_before_any_run(compare, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["compare_methods.py", "--concepts", "red", "--methods", "trust,fmn"])
    with pytest.raises(SystemExit) as e:
        compare.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown method(s) fmn" in err and len(err.strip().splitlines()) == 1


def test_print_without_table_is_refused(compare, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["compare_methods.py", "--print", "--results", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        compare.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--print goes with --table" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_leak_scans_pool_per_description_over_seeds(compare, monkeypatch, capsys, tmp_path):
    """leak_max of a (concept, method) is the highest rate of a description pooled over the seeds'
    scans, with its counts and Wilson interval; the worst seed's own leak_max beside it; runs saved
    before the scan existed count as measured with --leak-images 0."""
    from trust_fast.evaluation.metrics import wilson

    runs = [{"leak_by_description": {"red": [3, 10], "circle": [1, 10]}, "leak_max": 0.3},
            {"leak_by_description": {"red": [0, 10], "circle": [4, 10]}, "leak_max": 0.4}]
    out = compare.pooled_leak(runs)
    assert (out["leak_max_description"], out["leak_max_k"], out["leak_max_n"]) == ("circle", 5, 20)
    assert (out["leak_max_lo"], out["leak_max_hi"]) == wilson(5, 20) and out["leak_max_worst"] == 0.4
    assert compare.pooled_leak([{"ua": 0.0}]) == {}
    old = {"concept": "red", "method": "trust", "seed": 0, "steps_override": None, "images": 96, "attack_images": 32,
           "attacks": [], "attack_settings": {}}
    path = tmp_path / "runs.jsonl"
    path.write_text(__import__("json").dumps(old) + "\n")
    assert compare.read_runs(str(path), leak_images=0) and not compare.read_runs(str(path), leak_images=2)
    assert compare.run_key(old) == compare.run_key({**old, "leak_images": 0})
    monkeypatch.setattr(sys, "argv", ["compare_methods.py", "--leak-images", "-1", "--results", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        compare.main()
    assert e.value.code == 2 and "--leak-images must be >= 0" in capsys.readouterr().err


def test_results_block_replaces_only_the_marked_part(compare, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- COMPARE:BEGIN -->\nold table\n<!-- COMPARE:END -->\noutro\n")
    block = "<!-- COMPARE:BEGIN -->\nnew table\n<!-- COMPARE:END -->"
    compare.replace_block(str(readme), block)
    assert readme.read_text() == "intro\n" + block + "\noutro\n"
    plain = tmp_path / "other.md"  # no markers, no heading: left alone
    plain.write_text("text\n")
    compare.replace_block(str(plain), block)
    assert plain.read_text() == "text\n"
    bench = tmp_path / "BENCHMARKS.md"  # no markers, a heading: appended under it
    bench.write_text("# Benchmarks\n")
    compare.replace_block(str(bench), block, "## TRUST vs SalUn vs ESD")
    assert bench.read_text() == "# Benchmarks\n\n## TRUST vs SalUn vs ESD\n\n" + block + "\n"
    assert list(tmp_path.iterdir()) and not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]


def test_pairs_with_the_same_training_share_one_run(compare):
    assert compare.training_groups(["red", "red+circle", "circle", "red|circle"]) == [
        ["red"], ["red+circle", "red|circle"], ["circle"]]
    assert compare.per_prompt("red", 96) * 6 >= 96 and compare.per_prompt("red+circle", 96) == 48
    # retain prompts: the forget sample per prompt, capped near RETAIN_IMAGES images (only the pairs hit it)
    assert compare.retain_per_prompt("red", 16) == 16 and compare.retain_per_prompt("red+circle", 48) == 14


def test_rates_are_pooled_over_seeds_with_wilson_intervals(compare):
    from trust_fast.evaluation.metrics import wilson

    def run(seed, ua, hits):
        return {"concept": "red", "method": "trust", "seed": seed, "ua": ua, "n_forget": 96, "retain_acc": 0.95,
                "retain_before": 1.0 if seed else 0.95, "fd": 110.0, "fd_self": 100.0, "seconds": 40.0 + seed,
                "secs_to_ua05": None if seed == 2 else 10.0, "peak_rss_mb": 1.0, "train_mem_mb": 1.0,
                "optimizer_state_bytes": 8, "asr_softprompt": hits / 32, "asr_softprompt_hits": hits,
                "asr_softprompt_n": 32}

    (row,) = compare.aggregate([run(0, 0.0, 1), run(1, 2 / 96, 3), run(2, 4 / 96, 0)], ["red"], ["trust"])
    assert (row["ua_k"], row["ua_n"], row["ua_worst"]) == (6, 288, 4 / 96)
    assert (row["ua_lo"], row["ua_hi"]) == wilson(6, 288)
    assert (row["asr_softprompt_k"], row["asr_softprompt_n"]) == (4, 96)
    assert row["retain_ratio_min"] == 0.95 and row["seconds"] == 41.0 and row["secs_to_ua05"] is None
    assert "asr_embedding" not in row and compare.rate(row, "asr_embedding") == "-"
    assert compare.rate(row, "ua").startswith("0.021 (6/288; 0.01-0.04)")


@pytest.mark.slow
def test_a_tiny_comparison_runs_once_and_resumes(compare, tmp_path, monkeypatch):
    """Two concepts with one training set, ESD at 2 steps, every attack at 2 steps: one training
    run reports both; the second call finds both runs saved and trains nothing."""
    import json

    argv = ["compare_methods.py", "--concepts", "red+circle,red|circle", "--methods", "esd", "--seeds", "0",
            "--steps", "2", "--images", "4", "--attack-images", "2", "--softprompt-steps", "2", "--embedding-steps",
            "2", "--inversion-steps", "2", "--eval-every", "1", "--sample-steps", "2", "--results", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    assert compare.main() == 0
    runs = [json.loads(line) for line in (tmp_path / "compare_runs.jsonl").read_text().splitlines()]
    assert [r["concept"] for r in runs] == ["red+circle", "red|circle"]
    assert {r["trained_on"] for r in runs} == {"red+circle"} and runs[0]["seconds"] == runs[1]["seconds"]
    for r in runs:
        assert r["n_forget"] >= 4 and all(r[f"asr_{a}_n"] >= 2 for a in compare.ATTACKS)
        # ESD trains every cross-attention key/value row: all target rows, a small part of the UNet
        assert r["selected_fraction"] == 1.0 and 0 < r["patch_fraction"] < 0.5
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert [(r["concept"], r["ua_n"]) for r in rows] == [(r["concept"], r["n_forget"]) for r in runs]
    assert (tmp_path / "compare.png").stat().st_size > 0
    # the original model's figures are computed once per concept and sample, shared by every method
    originals = [json.loads(line) for line in (tmp_path / "originals.jsonl").read_text().splitlines()]
    assert sorted(o["key"]["concept"] for o in originals) == ["red+circle", "red|circle"]
    assert runs[0]["retain_before"] == originals[0]["figures"]["retain_acc"]

    def no_training(*a, **k):
        raise AssertionError("a saved run was trained again")

    monkeypatch.setattr(compare.subprocess, "Popen", no_training)
    assert compare.main() == 0
    # --table --print: the table from the saved runs, and nothing written
    (tmp_path / "compare.json").unlink()
    monkeypatch.setattr(sys, "argv", [*argv, "--table", "--print"])
    assert compare.main() == 0
    assert not (tmp_path / "compare.json").exists()


def test_variants_are_trust_with_named_fields(compare, monkeypatch):
    monkeypatch.setattr(compare, "VARIANTS", dict(compare.VARIANTS))
    assert compare.add_variant("trust-x0:x0_per_prompt=8,x0_steps=5") == "trust-x0"
    cfg = compare.method_config("trust-x0", seed=3)
    assert (cfg.x0_per_prompt, cfg.x0_steps, cfg.seed, cfg.method) == (8, 5, 3, "trust")
    with pytest.raises(SystemExit) as e:
        compare.add_variant("trust-x0")
    assert e.value.code == 2
    with pytest.raises(ValueError, match="unknown TrustConfig field"):
        compare.add_variant("bad:x0_per_promt=8")


def test_saved_runs_count_for_the_method_whose_configuration_they_ran(compare, monkeypatch, capsys):
    """A run is recognised by its saved TrustConfig: a variant's run counts for the default once
    the default has its configuration, and a method's runs from before its configuration changed
    no longer count (stderr says so); a field the run predates is not drift."""
    import dataclasses
    import json

    monkeypatch.setattr(compare, "VARIANTS", dict(compare.VARIANTS))
    compare.add_variant("trust-x0:x0_per_prompt=3")

    def saved(method, seed, **fields):
        cfg = json.loads(json.dumps(dataclasses.asdict(compare.method_config(method, seed=seed))))
        return {"concept": "red", "method": method, "seed": seed, "steps_override": None, "config": {**cfg, **fields}}

    old_default = saved("trust", 0, x0_per_prompt=7)         # trust before its default moved
    variant = saved("trust-x0", 1)                           # the variant as it ran
    predates = saved("salun", 0)
    del predates["config"]["adv_mode"]                       # a run from before that field existed
    runs = [old_default, variant, predates]
    assert [(r["method"], r["seed"]) for r in compare.runs_of(runs, ["trust", "salun"])] == [("salun", 0)]
    err = capsys.readouterr().err
    # (x0_retain_per_prompt follows x0_per_prompt when unset, so it moved too)
    assert "1 saved run(s) of trust trained with another configuration (x0_per_prompt, x0_retain_per_prompt)" in err
    # the default takes the variant's configuration: the variant's run now counts for trust too
    monkeypatch.setitem(compare.VARIANTS, "trust", ("trust", {"x0_per_prompt": 3}))
    got = compare.runs_of(runs, ["trust", "trust-x0"])
    assert [(r["method"], r["seed"]) for r in got] == [("trust", 1), ("trust-x0", 1)]
    assert got[0]["config"] == variant["config"] and variant["method"] == "trust-x0"  # the saved run is not changed
    assert compare.config_drift({"concept": "red", "method": "esd", "seed": 0}, "salun") == {"method": ("esd", "salun")}


def test_a_run_from_before_a_predated_field_ran_what_the_code_did_then(compare, monkeypatch):
    """x0_retain_per_prompt (engine.PREDATED_FIELDS) came after runs were saved, and a run without
    it cached as many retain images as forget images: it counts for trust, not for a variant (or a
    future default) that caches fewer."""
    import dataclasses
    import json

    monkeypatch.setattr(compare, "VARIANTS", dict(compare.VARIANTS))
    compare.add_variant("trust-r2:x0_retain_per_prompt=2")
    cfg = json.loads(json.dumps(dataclasses.asdict(compare.method_config("trust", seed=2))))
    del cfg["x0_retain_per_prompt"]
    before = {"concept": "red", "method": "trust", "seed": 2, "steps_override": None, "config": cfg}
    assert compare.config_drift(before, "trust-r2") == {"x0_retain_per_prompt": (8, 2)}
    assert compare.config_drift(before, "trust") == {}
    assert [r["method"] for r in compare.runs_of([before], ["trust", "trust-r2"])] == ["trust"]
    # and a run of the variant is not one of trust's (None there means "as x0_per_prompt": 8)
    after = {**before, "method": "trust-r2", "config": {**cfg, "x0_retain_per_prompt": 2}}
    assert compare.config_drift(after, "trust") == {"x0_retain_per_prompt": (2, 8)}
    assert [r["method"] for r in compare.runs_of([before, after], ["trust", "trust-r2"])] == ["trust", "trust-r2"]


def test_the_front_keeps_undominated_settings_and_names_the_bars_missed(compare, tmp_path, monkeypatch, capsys):
    """--front: every (concept, setting) pooled over seeds, from several runs files kept apart; a
    setting worse on every axis than another is off the front; each row lists the #16 bars it misses."""
    import json

    def run(method, seed, ua_k, asr_k, retain, seconds, concept="red"):
        dense = method == "salun"  # half of every weight: not selective
        return {"concept": concept, "method": method, "seed": seed, "ua": ua_k / 96, "n_forget": 96,
                "retain_acc": retain, "retain_before": 1.0, "fd": 1.0, "fd_self": 1.0, "seconds": seconds,
                "selected_fraction": 1.0 if dense else 0.05, "patch_fraction": 0.5 if dense else 0.06,
                "secs_to_ua05": None, "peak_rss_mb": 1.0, "train_mem_mb": 1.0, "optimizer_state_bytes": 8,
                "asr_softprompt": asr_k / 32, "asr_softprompt_hits": asr_k, "asr_softprompt_n": 32}

    main_dir, other_dir = tmp_path / "results", tmp_path / "results" / "robust"
    other_dir.mkdir(parents=True)
    unattacked = {k: v for k, v in run("fast", 0, 0, 0, 1.0, 10.0).items() if not k.startswith("asr_")}
    fewer = dict(run("trust", 2, 0, 0, 1.0, 300.0), images=48)  # measured on fewer images: its own setting
    (main_dir / "compare_runs.jsonl").write_text("\n".join(json.dumps(r) for r in [
        run("trust", 0, 0, 2, 0.99, 100.0), run("trust", 1, 1, 1, 0.97, 110.0),     # meets every measured bar
        run("salun", 0, 0, 1, 0.45, 60.0), run("salun", 1, 0, 0, 0.50, 60.0),       # robust, breaks retain
        run("worse", 0, 3, 9, 0.90, 200.0), run("worse", 1, 3, 9, 0.90, 200.0),
        unattacked, fewer]) + "\n")
    (other_dir / "compare_runs.jsonl").write_text(json.dumps(run("trust", 0, 0, 20, 1.0, 50.0)) + "\n")
    monkeypatch.setattr(sys, "argv", ["compare_methods.py", "--front", "--concepts", "red", "--results",
                                      str(main_dir)])
    assert compare.main() == 0
    rows = {r["setting"]: r for r in json.loads((main_dir / "front.json").read_text())}
    assert set(rows) == {"trust [results]", "salun [results]", "worse [results]", "trust [results/robust]",
                         "fast [results]", "trust [results] images=48"}
    assert rows["trust [results] images=48"]["seeds"] == "2" and rows["trust [results]"]["seeds"] == "0 1"
    # never attacked: on the front by its other axes, but it pushes no attacked setting off it
    assert rows["fast [results]"]["front"] and "asr_softprompt" in rows["fast [results]"]["missed"][-1]
    assert rows["trust [results]"]["front"] and rows["salun [results]"]["front"]
    assert rows["trust [results/robust]"]["front"]  # fast and best retain, if the least robust
    assert not rows["worse [results]"]["front"]  # trust [results] beats it on every axis
    unmeasured = "not measured: asr_paraphrase, asr_embedding, asr_inversion"
    assert rows["trust [results]"]["missed"] == [unmeasured]
    assert (rows["trust [results]"]["ua_k"], rows["trust [results]"]["ua_n"]) == (1, 192)
    assert rows["salun [results]"]["missed"] == ["retain_ratio_min 0.450 < 0.95", "selected_fraction_max 1.000 > 0.10",
                                                 "patch_fraction_max 0.500 > 0.08", unmeasured]
    assert any(m.startswith("asr_softprompt 0.625 > 0.10") for m in rows["trust [results/robust]"]["missed"])
    assert (main_dir / "front.png").stat().st_size > 0
    assert "| red | trust [results] | 0 1 |" in capsys.readouterr().out
    # nothing saved for the concepts asked: one line, exit code 2
    monkeypatch.setattr(sys, "argv", ["compare_methods.py", "--front", "--concepts", "circle", "--results",
                                      str(main_dir)])
    with pytest.raises(SystemExit) as e:
        compare.main()
    assert e.value.code == 2 and "no saved runs of circle" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["compare_methods.py", "--table", "--concepts", "circle", "--results",
                                      str(main_dir)])
    with pytest.raises(SystemExit) as e:
        compare.main()
    assert e.value.code == 2 and "no saved runs" in capsys.readouterr().err
    assert not (main_dir / "compare.csv").exists()
    monkeypatch.setattr(sys, "argv", ["compare_methods.py", "--front", str(tmp_path / "nope.jsonl")])
    with pytest.raises(SystemExit) as e:
        compare.main()
    assert e.value.code == 2 and "no runs file" in capsys.readouterr().err
