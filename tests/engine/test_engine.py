"""Engine mechanics on small untrained pipelines: masked steps, frozen parts, methods, Hessian modes,
the low-level API, and the Stable Diffusion code path (VAE latents)."""
import json
import tempfile

import pytest
import torch

from trust_fast import TrustConfig, TrustUnlearner, methods
from trust_fast.concepts import parse_concept, user_prompts
from trust_fast.engine import encode_images
from helpers import SMALL
from tiny_pipelines import tiny_sd_pipeline  # noqa: F401  (other test files import it from here)


def fresh(pipe):
    import copy

    return copy.deepcopy(pipe)


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_masked_steps_touch_only_selected_rows_and_nothing_outside_the_targets(untrained_world):
    pipe = fresh(untrained_world)
    u = TrustUnlearner(pipe, "red", TrustConfig(hessian="none", **SMALL))
    target_names = {n for n, _ in pipe.unet.named_parameters() if any(n.startswith(t.name + ".") for t in u.targets)}
    assert all(p.requires_grad == (n in target_names) for n, p in pipe.unet.named_parameters())
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    ever = {t.name: set() for t in u.targets}
    before = snapshot(pipe.unet)
    for _ in range(3):
        prev = snapshot(pipe.unet)
        s = u.step()
        assert 0 < s["selected_rows"] < 0.15 * u.total_rows
        for t, rows in zip(u.targets, u.selected_rows):
            changed = (t.weight.detach() != prev[t.name + ".weight"]).any(dim=1).nonzero().flatten().tolist()
            assert set(changed) <= set(rows.tolist()), t.name
            ever[t.name] |= set(rows.tolist())
    after = snapshot(pipe.unet)
    for n in after:
        if n not in target_names:
            assert torch.equal(after[n], before[n]), n
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert any(not torch.equal(after[n], before[n]) for n in target_names)
    rep = u.report()
    assert rep["optimizer_state_bytes"] > 0
    # compact state: moments only for rows ever selected (2 fp32 moments per element of such a row)
    width = u.targets[0].weight.shape[1]
    assert rep["optimizer_state_bytes"] < 2 * 4 * width * sum(len(v) for v in ever.values()) * 2 + 8 * u.total_rows


@pytest.mark.parametrize("hessian", ["hvp", "diag"])
def test_hessian_modes_step_and_penalise(untrained_world, hessian):
    pipe = fresh(untrained_world)
    u = TrustUnlearner(pipe, "red+circle", TrustConfig(hessian=hessian, diag_interval=2, lam=10.0, **SMALL))
    for _ in range(3):
        s = u.step()
        assert torch.isfinite(torch.tensor(s["loss_forget"])) and torch.isfinite(torch.tensor(s["loss_retain"]))
    if hessian == "diag":
        assert u.hutchinson.count == 2 and u.report()["hessian_bytes"] > 0
        assert any(d.abs().sum() > 0 for d in u.hutchinson.diags)


def test_salun_mask_and_esd_parameters_follow_the_published_recipes(untrained_world):
    pipe = fresh(untrained_world)
    u = TrustUnlearner(pipe, "red", methods.config("salun", **SMALL))
    assert u.trainable_params == sum(p.numel() for p in pipe.unet.parameters())
    before = snapshot(pipe.unet)
    u.step()
    rep = u.report()
    assert abs(rep["mask_fraction"] - 0.5) < 1e-3
    names = [n for n, _ in pipe.unet.named_parameters()]
    for n, p, m in zip(names, u.params, u.mask):
        moved = p.detach() != before[n]
        assert not (moved & (m == 0)).any(), n   # only weights inside the static mask move
    pipe = fresh(untrained_world)
    e = TrustUnlearner(pipe, "red", methods.config("esd", **SMALL))
    assert {t.name.rsplit(".attn2.", 1)[1] for t in e.targets} == {"to_q", "to_k", "to_v", "to_out.0"}
    assert e.config.retain_objective == "none" and e.config.forget_objective == "esd" and e.config.eta == 1.0
    before = snapshot(pipe.unet)
    s = e.step()
    assert s["loss_retain"] is None and s["selected_fraction"] == 1.0
    moved = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all(".attn2." in n for n in moved)


def test_low_level_api_on_a_batch_you_provide(untrained_world):
    pipe = fresh(untrained_world)
    trust = TrustUnlearner(pipe, "red", TrustConfig(hessian="hvp"))
    from trust_fast.engine import encode_prompts

    cond = encode_prompts(pipe, ["a red circle", "a striped red square"])
    anchor = encode_prompts(pipe, ["a green circle", "a striped blue square"])
    retain = encode_prompts(pipe, ["a blue circle", "a yellow triangle"])
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    for step in range(2):
        t = torch.tensor([100, 700])
        noisy = pipe.scheduler.add_noise(x0, torch.randn_like(x0), t)
        stats = trust.update(trust.forget_loss(noisy, t, cond, anchor), trust.retain_loss(noisy, t, retain))
        assert stats["step"] == step and stats["selected_rows"] > 0
    assert trust.pools is None  # the low-level path never samples its own data


def test_config_validation_names_the_problem(untrained_world):
    with pytest.raises(ValueError, match="hessian"):
        TrustConfig(hessian="exact").validate()
    with pytest.raises(ValueError, match="unknown TrustConfig"):
        TrustConfig().replace(learning_rate=1.0)
    with pytest.raises(ValueError, match="retain objective"):
        TrustConfig(retain_objective="none").validate()
    with pytest.raises(ValueError, match="retain_neighbors"):
        TrustConfig(retain_neighbors=1.5).validate()
    with pytest.raises(ValueError, match="x0_retain_per_prompt"):
        TrustConfig(x0_retain_per_prompt=0).validate()
    with pytest.raises(ValueError, match="unknown method"):
        methods.config("fmn")
    with pytest.raises(ValueError, match="prompts"):
        TrustUnlearner(tiny_sd_pipeline(), "nudity")


def test_the_retain_cache_can_hold_fewer_images_per_prompt(untrained_world):
    cfg = TrustConfig(**{**SMALL, "x0_per_prompt": 3, "x0_retain_per_prompt": 1})
    u = TrustUnlearner(fresh(untrained_world), "red", cfg)
    u.prepare()
    assert {k: tuple(v.shape[:2]) for k, v in u.pools.items()} == {
        "forget": (len(u.prompts.forget), 3), "anchor": (len(u.prompts.anchors), 3),
        "retain": (len(u.prompts.retain), 1)}
    b = u.retain_batch(64)  # retain batches draw from the one image of each prompt
    assert all(any(torch.equal(x, y) for y in u.pools["retain"][:, 0]) for x in b.x0)
    u.step()
    u2 = TrustUnlearner(fresh(untrained_world), "red", cfg.replace(x0_retain_per_prompt=None))
    u2.prepare()  # None: as many as the forget prompts get
    assert u2.pools["retain"].shape[1] == 3


@pytest.mark.parametrize("partial,concept,added", [("auto", "red+circle", True), ("auto", "red", False),
                                                    ("on", "red", True), ("off", "red+circle", False)])
def test_partial_prompts_train_on_the_whole_concepts_images(untrained_world, partial, concept, added):
    """TrustConfig.partial_prompts: the world's partial prompts join the forget and retain sets (auto:
    for A+B and A|B), and their data-free pools are sampled with the conditioning of the prompts whose
    images they train on, not their own."""
    from trust_fast.world.concepts import world_prompts

    u = TrustUnlearner(fresh(untrained_world), concept, TrustConfig(partial_prompts=partial, **SMALL))
    spec = parse_concept(concept)
    expected = world_prompts(spec, every_template=True, partial=added)
    assert (u.prompts.forget, u.prompts.retain) == (expected.forget, expected.retain)
    wanted = u.data.wanted()
    family = u.family
    for kind in ("forget", "retain"):
        sources = expected.image_prompts(kind)
        assert torch.equal(wanted[kind], family.encode(sources))
        if added:
            own = getattr(u.emb, kind)
            assert not torch.equal(wanted[kind], own)  # the partial rows differ from their own prompts
        else:
            assert getattr(u.emb, f"{kind}_images") is None
    u.prepare()
    assert u.pools["forget"].shape[0] == len(expected.forget) and u.pools["retain"].shape[0] == len(expected.retain)
    # a forget batch draws partial_fraction of its rows from the partial prompts, the rest from the whole concept's
    partial = {i for i, (p, src) in enumerate(zip(expected.forget, expected.image_prompts("forget"))) if p != src}
    assert bool(partial) == added
    rows = u.data._forget_rows(16).tolist()
    assert sum(r in partial for r in rows) == (round(u.config.partial_fraction * 16) if added else 0)
    # a partial retain entry ("a red" on red squares) is distilled toward the frozen model on its source
    rb = u.retain_batch(64)
    if not added:
        assert rb.anchor is None
    else:
        own, src = u.emb.retain, u.emb.retain_images
        moved = [k for k in range(64) if not torch.equal(rb.anchor[k], rb.cond[k])]
        assert moved
        for k in moved:
            assert any(torch.equal(rb.cond[k], own[j]) and torch.equal(rb.anchor[k], src[j]) and
                       not torch.equal(own[j], src[j]) for j in range(own.shape[0]))
    u.step()


def test_retain_batches_oversample_the_neighbors_of_a_pair(untrained_world):
    u = TrustUnlearner(fresh(untrained_world), "red+circle", TrustConfig(retain_neighbors=0.5, **SMALL))
    u.prepare()
    nb = set(u.prompts.neighbors(u.concept))
    assert nb and len(nb) < len(u.prompts.retain)
    drawn = []
    for _ in range(50):
        b = u.retain_batch(8)
        # which retain prompt each row came from: match its embedding
        idx = [int((u.emb_retain - c).abs().flatten(1).sum(1).argmin()) for c in b.cond]
        assert all(i in nb for i in idx[:4])  # the first half is drawn from the neighbours
        drawn += idx[4:]
    # the rest is uniform over all retain prompts, neighbours included
    assert set(drawn) - nb and set(drawn) & nb


def test_stable_diffusion_pipeline_with_vae_unlearns_and_round_trips(tmp_path):
    from diffusers import DiffusionPipeline

    pipe = tiny_sd_pipeline()
    spec = parse_concept("red", world=False)
    prompts = user_prompts(spec, ["a red circle", "a red square"], ["a blue circle"], None)
    assert prompts.anchors == ["a circle", "a square"]
    u = TrustUnlearner(pipe, spec, TrustConfig(**SMALL), prompts=prompts)
    names = [t.name for t in u.targets]
    # the default targets of a real SD layout: cross-attention q/k/v and the feed-forward layers
    assert names and all(".attn2.to_" in n or ".ff.net." in n for n in names)
    assert any(n.endswith("attn2.to_k") for n in names) and any(n.endswith("ff.net.2") for n in names)
    before = snapshot(pipe.unet)
    for _ in range(2):
        s = u.step()
    assert u.pools["forget"].shape[2:] == (4, 8, 8)  # latents, not pixels
    assert any(not torch.equal(p.detach(), before[n]) for n, p in pipe.unet.named_parameters())
    lat = encode_images(pipe, torch.zeros(1, 3, 16, 16))
    assert lat.shape == (1, 4, 8, 8)
    u.save(str(tmp_path / "out"))
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    for n, p in loaded.unet.named_parameters():
        assert torch.equal(p, dict(pipe.unet.named_parameters())[n].detach()), n
    assert json.load(open(tmp_path / "out" / "model_index.json"))["_class_name"] == "StableDiffusionPipeline"
    assert s["loss_retain"] is not None


def _adversarial_rows_then_resume(u, world, cfg, tmp_path):
    """Half of a forget batch is conditioned on the adversary's prompts, the other half on the plain
    ones; after a step the adversary's state survives a checkpoint. Returns the resumed unlearner."""
    from trust_fast.checkpoint import load_checkpoint, save_checkpoint

    b = u.forget_batch(8)
    adv_rows = [any(torch.equal(c, e) for e in u.emb_forget_adv[0]) for c in b.cond]
    assert adv_rows == [False] * 4 + [True] * 4
    u.step()
    save_checkpoint(u, str(tmp_path))
    v = TrustUnlearner(fresh(world), "red", cfg)
    load_checkpoint(v, str(tmp_path))
    assert torch.equal(v.adv_prefixes[0], u.adv_prefixes[0]) and torch.equal(v.emb_forget_adv[0], u.emb_forget_adv[0])
    return v


def test_adversarial_prefix_lowers_the_attack_loss_and_enters_forget_batches(untrained_world, tmp_path):
    from trust_fast import objectives
    from trust_fast.softprompt import encode_with_prefix, prefixed_ids

    cfg = TrustConfig(adv_prefix=3, adv_steps=8, adv_interval=100, adv_lr=0.05, adv_fraction=0.5, steps=1, **SMALL)
    u = TrustUnlearner(fresh(untrained_world), "red", cfg)
    u.prepare()
    ids = prefixed_ids(u.family, u.prompts.forget, 3)
    g = torch.Generator().manual_seed(5)
    x0 = u.pools["forget"][:, 0]
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    noisy = objectives.add_noise(x0, noise, t, u.alphas_cumprod)

    def attack_loss(prefix):  # what the adversary minimizes: the model's diffusion loss on the concept
        with torch.no_grad():
            return float(objectives.mse(u.pred(noisy, t, encode_with_prefix(u.family, ids, prefix)), noise))

    u.refresh_adversary()
    first = u.adv_prefixes[0].clone()
    for _ in range(3):
        u.refresh_adversary()
    assert len(u.adv_prefixes) == len(u.emb_forget_adv) == 1 and u.adv_refreshes == 4
    assert u.emb_forget_adv[0].shape == u.emb_forget.shape
    assert attack_loss(u.adv_prefixes[0]) < attack_loss(first)
    v = _adversarial_rows_then_resume(u, untrained_world, cfg, tmp_path)
    assert (v.adv_optimizers[0].state_dict()["state"][0]["step"]
            == u.adv_optimizers[0].state_dict()["state"][0]["step"])


def test_token_offset_adversary_lowers_the_attack_loss_per_prompt(untrained_world, tmp_path):
    """adv_mode='tokens': one offset per forget prompt on every input token embedding after the
    start token (the embedding attack's search space), starting at zero (the prompts themselves);
    refreshes lower the model's diffusion loss on the concept's images, the forget prompts are
    re-encoded with their own offsets, and the state survives a checkpoint (shape-checked)."""
    from trust_fast import objectives
    from trust_fast.checkpoint import load_checkpoint
    from trust_fast.softprompt import encode_with_offsets, widths

    cfg = TrustConfig(adv_prefix=1, adv_mode="tokens", adv_steps=8, adv_interval=100, adv_lr=0.05,
                      adv_fraction=0.5, steps=1, **SMALL)
    u = TrustUnlearner(fresh(untrained_world), "red", cfg)
    u.prepare()
    ids = u.family.tokenize(u.prompts.forget)
    n_prompts = len(u.prompts.forget)
    assert u.adversary_shape() == (n_prompts, ids[0].shape[1] - 1, sum(widths(u.family)))
    zero = torch.zeros(u.adversary_shape())
    with torch.no_grad():  # zero offsets are the prompts' own conditioning
        torch.testing.assert_close(encode_with_offsets(u.family, ids, zero), u.emb_forget, rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(5)
    x0 = u.pools["forget"][:, 0]
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    noisy = objectives.add_noise(x0, noise, t, u.alphas_cumprod)

    def attack_loss(offsets):
        with torch.no_grad():
            return float(objectives.mse(u.pred(noisy, t, encode_with_offsets(u.family, ids, offsets)), noise))

    for _ in range(4):
        u.refresh_adversary()
    (offsets,) = u.adv_prefixes
    assert offsets.shape == u.adversary_shape() and offsets[:, 0].abs().sum() > 0
    assert attack_loss(offsets) < attack_loss(zero)
    # every forget prompt carries its own offsets: re-encoded rows match the per-prompt encoding
    with torch.no_grad():
        torch.testing.assert_close(u.emb_forget_adv[0][:2], encode_with_offsets(u.family, [x[:2] for x in ids],
                                                                                offsets[:2]))
    _adversarial_rows_then_resume(u, untrained_world, cfg, tmp_path)
    # a prefix checkpoint is another config; token offsets of the wrong shape are refused in one line
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    state["adversary"]["prefixes"] = [offsets[:-1].clone()]
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="offsets of .* forget prompts"):
        load_checkpoint(TrustUnlearner(fresh(untrained_world), "red", cfg), str(tmp_path))
    with pytest.raises(ValueError, match="adv_mode must be one of"):
        TrustConfig(adv_mode="suffix").validate()
    with pytest.raises(ValueError, match="adv_retain_fraction needs adv_mode='prefix'"):
        TrustConfig(adv_mode="tokens", adv_retain_fraction=0.5).validate()
    with pytest.raises(ValueError, match="adv_population > 1 needs adv_mode='prefix'"):
        TrustConfig(adv_mode="tokens", adv_population=2).validate()


def test_an_adversary_population_steps_its_prefixes_in_turn(untrained_world, tmp_path):
    """adv_population=3: three prefixes from their own random starts, one refresh steps one of them
    in turn (the cost of one prefix per refresh), adversarial rows draw from all that exist, and all
    of it survives a checkpoint."""
    from trust_fast.checkpoint import load_checkpoint, save_checkpoint

    cfg = TrustConfig(adv_prefix=2, adv_steps=2, adv_interval=100, adv_population=3, adv_fraction=1.0, steps=1,
                      **SMALL)
    u = TrustUnlearner(fresh(untrained_world), "red", cfg)
    u.prepare()
    u.refresh_adversary()
    u.refresh_adversary()
    assert len(u.adv_prefixes) == 2 and not torch.equal(u.adv_prefixes[0], u.adv_prefixes[1])
    starts = [q.clone() for q in u.adv_prefixes]
    u.refresh_adversary()
    u.refresh_adversary()  # the 4th refresh steps the first prefix again; the second is untouched
    assert len(u.adv_prefixes) == 3 and u.adv_refreshes == 4
    assert not torch.equal(u.adv_prefixes[0], starts[0]) and torch.equal(u.adv_prefixes[1], starts[1])
    b = u.forget_batch(64)
    used = {k for c in b.cond for k, e in enumerate(u.emb_forget_adv) if any(torch.equal(c, x) for x in e)}
    assert used == {0, 1, 2}
    save_checkpoint(u, str(tmp_path))
    v = TrustUnlearner(fresh(untrained_world), "red", cfg)
    load_checkpoint(v, str(tmp_path))
    assert v.adv_refreshes == 4 and all(torch.equal(a, b) for a, b in zip(v.adv_prefixes, u.adv_prefixes))
    assert all(torch.equal(a, b) for a, b in zip(v.emb_forget_adv, u.emb_forget_adv))
    with pytest.raises(ValueError, match="adv_population must be >= 1"):
        TrustConfig(adv_population=0).validate()


def test_adv_retain_fraction_puts_retain_prompts_behind_the_prefix(untrained_world, tmp_path):
    """adv_retain_fraction=0.5: the last half of a retain batch is conditioned on its retain prompts
    encoded behind the adversary's prefix (their distillation target is the original model on that
    same conditioning), the first half on the plain prompts; the encodings survive a checkpoint."""
    from trust_fast.checkpoint import load_checkpoint, save_checkpoint

    cfg = TrustConfig(adv_prefix=2, adv_steps=1, adv_interval=100, adv_retain_fraction=0.5, steps=1, **SMALL)
    u = TrustUnlearner(fresh(untrained_world), "red", cfg)
    u.prepare()
    plain = u.retain_batch(8)
    assert all(any(torch.equal(c, e) for e in u.emb_retain) for c in plain.cond)  # no prefix yet
    u.refresh_adversary()
    assert len(u.emb_retain_adv) == 1 and u.emb_retain_adv[0].shape == u.emb_retain.shape
    b = u.retain_batch(8)
    behind = [any(torch.equal(c, e) for e in u.emb_retain_adv[0]) for c in b.cond]
    assert behind == [False] * 4 + [True] * 4
    assert u.step()["loss_retain"] is not None
    save_checkpoint(u, str(tmp_path))
    v = TrustUnlearner(fresh(untrained_world), "red", cfg)
    load_checkpoint(v, str(tmp_path))
    assert torch.equal(v.emb_retain_adv[0], u.emb_retain_adv[0])
    with pytest.raises(ValueError, match="adv_retain_fraction must be in"):
        TrustConfig(adv_retain_fraction=1.5).validate()


def test_finalize_resets_rows_updated_fewer_than_min_row_updates(untrained_world, tmp_path):
    u = TrustUnlearner(fresh(untrained_world), "red", TrustConfig(steps=6, min_row_updates=3, **SMALL))
    for _ in range(6):
        u.step()
    trained = [p.detach().clone() for p in u.params]
    pos = {id(p): k for k, p in enumerate(u.params)}
    counts = {}
    for t in u.targets:
        rows, n = u.optimizer.row_updates(t.weight)
        counts[t.name] = dict(zip(rows.tolist(), n.tolist()))
        assert torch.equal(u.optimizer.edited_rows(t.weight), rows)  # the no-copy view FSDP's frozen pass reads
    assert any(c < 3 for cs in counts.values() for c in cs.values())   # the test means something
    assert any(c >= 3 for cs in counts.values() for c in cs.values())
    info = u.finalize()
    assert info["rows_reset"] == sum(c < 3 for cs in counts.values() for c in cs.values())
    for t in u.targets:
        k = pos[id(t.weight)]
        for r in range(t.rows):
            c = counts[t.name].get(r, 0)
            expect = u.theta0[k][r] if c < 3 else trained[k][r]
            assert torch.equal(t.weight[r], expect), (t.name, r, c)
    assert u.finalize() is info                      # idempotent
    assert u.report()["finalized"]["rows_kept"] == info["rows_kept"]
    u.step()
    assert u.finalized is None                       # a new step reopens the edit


def test_run_and_save_finalize_and_dense_methods_are_untouched(untrained_world, tmp_path):
    u = TrustUnlearner(fresh(untrained_world), "red", TrustConfig(steps=3, min_row_updates=2, **SMALL))
    u.run()
    assert u.finalized is not None and u.finalized["min_row_updates"] == 2
    e = TrustUnlearner(fresh(untrained_world), "red", methods.config("esd", steps=2, **SMALL))
    e.run()
    before = [p.detach().clone() for p in e.params]
    assert e.finalize()["rows_reset"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, e.params))
    with pytest.raises(ValueError, match="min_row_updates"):
        TrustConfig(min_row_updates=0).validate()
