"""The medium record of 2025-12-31 as the `medium_2025_12_31` preset (issue 20): each fact of
docs/record_facts/medium_2025-12-31.md that the preset sets, and each new feature against a plain
computation written here."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_gpt as tg
from conftest import optimizer_set

BLOCK = 128


@pytest.fixture(scope="module")
def cfg():
    return tg.build_config("medium_2025_12_31")


@pytest.fixture(scope="module")
def schedule(cfg):
    return tg.Schedule.of(cfg)


# --- the preset ------------------------------------------------------------------------------------


def test_model_shape_and_layout(cfg):
    m = cfg.model
    assert (m.num_layers, m.model_dim, m.num_heads, m.head_dim, m.gate_dims) == (16, 1024, 8, 128, 16)
    assert [i for i, c in enumerate(m.window_pattern) if c == "L"] == [0, 4, 11, 15] and "N" not in m.window_pattern
    assert [m.value_embed_pattern[i] for i in (0, 4, 5, 10, 11, 15)] == ["0", "4", ".", ".", "0", "4"]
    assert m.skip_connections == ((9, 6), (10, 4), (11, 2)) and m.skip_token_gate and m.skip_init == -1.5
    assert m.backout_layer == 11 and m.resid_lambda_init == 1.05 and m.sa_lambda_init == (0.5, 1.0)
    assert (m.softcap, m.softcap_scale, m.softcap_offset) == ("sigmoid", 23.0, 5.0)
    assert not m.fp8_head and m.head_init_std == 0.005 and m.value_embed_init_std == 0.0
    assert m.input_embeds == 2 and m.tie_embedding and m.untie_embedding_frac == pytest.approx(1 / 6)
    assert cfg.data.max_seq_len == 4096 and cfg.data.data_stream == "bos_aligned"
    assert cfg.loop.train_loss_reduction == "sum" and cfg.loop.val_every == 250


def test_optimiser_settings(cfg):
    o, labels = cfg.optim, cfg.optim.labels
    assert (o.optimizer, o.muon_lr, o.muon_wd, o.normuon_beta2, o.orthogonalizer) == (
        "normuon", 0.015, 1.2, 0.95, "polar_express")
    assert (o.adam_lr, o.adam_eps, o.adam_wd, o.adam_every) == (0.004, 1e-8, 0.005, 2)
    assert o.adam_cautious_strict and o.adam_eps_before_correction and o.adam_moment_dtype == "bfloat16"
    expected = {"lm_head": 0.004, "untied_embed": 0.004, "embed": 0.3, "value_embed": 0.3, "smear_gate": 4e-5,
                "skip_gate": 4e-5, "x0_lambdas": 0.02, "scalars": 0.04}
    assert {label: o.adam_lr * labels[label].lr for label in expected} == pytest.approx(expected)
    model = tg.GPT(small().model)  # the Adam labels its model has are exactly the record's
    assert {p.label for p in model.parameters() if labels[p.label].optimizer != "muon"} == set(expected)
    assert {k: labels[k].wd for k in ("lm_head", "untied_embed", "embed", "value_embed", "scalars")} == {
        "lm_head": 150.0, "untied_embed": 150.0, "embed": 5.0, "value_embed": 5.0, "scalars": 0.0}
    assert labels["scalars"].betas == (0.9, 0.99) and labels["lm_head"].betas == (0.8, 0.95)
    assert {k: labels[k].lr for k in ("attn", "attn_gate", "value_embed_gate", "mlp_fc", "mlp_proj")} == {
        "attn": 1.0, "attn_gate": 0.1, "value_embed_gate": 0.1, "mlp_fc": 1.0, "mlp_proj": 2.0}


def test_batch_and_window_stages(schedule):
    """Twelfths of 4700 steps: 131k, 262k, 393k, then 524k tokens; long windows 3, 7, 11, 13, ..., 23 blocks,
    short = min(11, long // 2); extension 23/11; final validation 27/11."""
    starts = [0, 392, 784, 1175, 1567, 1959, 2350, 2742, 3134]
    assert [schedule.batch_tokens(s) for s in starts[:4]] == [131_072, 262_144, 393_216, 524_288]
    assert schedule.batch_tokens(391) == 131_072 and schedule.batch_tokens(4739) == 524_288
    blocks = [tuple(w // BLOCK for w in schedule.windows(s)) for s in starts]
    assert blocks == [(3, 1), (7, 3), (11, 5), (13, 6), (15, 7), (17, 8), (19, 9), (21, 10), (23, 11)]
    assert [tuple(w // BLOCK for w in schedule.windows(s - 1)) for s in starts[1:4]] == [(3, 1), (7, 3), (11, 5)]
    assert schedule.windows(4700) == (23 * BLOCK, 11 * BLOCK) and schedule.total_steps == 4740
    assert schedule.final_val_windows() == (27 * BLOCK, 11 * BLOCK)


def test_yarn_only_while_the_long_window_is_at_most_13_blocks(schedule):
    grew = {s: schedule.at(s).window_grew_from // BLOCK for s in range(schedule.total_steps)
            if schedule.at(s).window_grew_from}
    assert grew == {392: 3, 784: 7, 1175: 11}


def test_lr_multiplier_stages_and_cooldown(schedule):
    """1.0, then 1.52 once x > 1/12, 1.73 once x > 2/12, 2.0 once x > 3/12 (strictly: step 1175 is exactly
    3/12, so 2.0 starts at 1176, one step after the batch stage); cooldown over the last 70% to 0.1."""
    lr = schedule.lr_multiplier
    assert [lr(s) for s in (0, 391, 392, 783, 784, 1175, 1176, 1410)] == [1.0, 1.0, 1.52, 1.52, 1.73, 1.73, 2.0, 2.0]
    assert lr(2000) == pytest.approx(2.0 * (4700 - 2000) / 3290 + 0.1 * (1 - (4700 - 2000) / 3290))
    assert lr(4700) == lr(4739) == 0.1


def test_momentum_warms_up_and_cools_over_the_last_50_steps(schedule):
    assert schedule.momentum(0) == 0.85 and schedule.momentum(300) == 0.95 and schedule.momentum(4690) == 0.95
    assert schedule.momentum(4715) == pytest.approx(0.90) and schedule.momentum(4739) == pytest.approx(0.852)


def test_multi_token_weights_over_the_first_quarter(schedule):
    w = schedule.target_weights
    assert w(0) == (1.0, 0.5, 0.25)
    assert w(391) == pytest.approx((1.0, 0.5, 0.25 * (1 - 3 * 391 / 1175)))
    assert w(392) == pytest.approx((1.0, 0.5 * (2 - 3 * 392 / 1175)))
    assert len(w(783)) == 2 and w(784) is None and w(4739) is None


def test_untie_after_the_adam_step_at_one_sixth(schedule):
    """ceil(4700/6) = 784 is not an Adam step (Adam steps at odd steps), so the last tied step is 785."""
    assert schedule.untie_step == 786
    assert [s for s in range(schedule.total_steps) if schedule.at(s).untie_embedding] == [786]
    assert 785 % 2 == 1  # an Adam step: no head gradient is left accumulating when the tables part


def test_scalar_adam_is_never_paused(cfg):
    assert cfg.schedule.scalar_pause_steps == 0


# --- the new features, at test size -----------------------------------------------------------------


def small(**overrides):
    """The cpu-size variant of the preset, smaller still."""
    base = dict(num_layers=4, model_dim=32, num_heads=2, head_dim=16, window_pattern="LSSL",
                value_embed_pattern="0..0", skip_connections=((3, 1),), backout_layer=2, gate_dims=8)
    return tg.build_config("medium_2025_12_31_cpu", **{**base, **overrides})


def test_qkv_init_bound_has_no_half():
    bound = math.sqrt(3) / math.sqrt(32)
    qkvo = tg.GPT(small().model).blocks[0].attn.qkvo.detach()
    assert qkvo[:3].abs().max() <= bound and qkvo[:3].abs().max() > 0.95 * bound and (qkvo[3] == 0).all()
    short = tg.GPT(small(qkv_init_gain=0.5).model).blocks[0].attn.qkvo.detach()
    assert short[:3].abs().max() <= 0.5 * bound


def test_softcap_23_sigmoid_shifted():
    z = torch.linspace(-40, 40, 9)
    torch.testing.assert_close(tg.softcap(z, "sigmoid", 23.0, 5.0), 23 / (1 + torch.exp(-(z + 5) / 7.5)))
    torch.testing.assert_close(tg.softcap(z, "sigmoid"), 30 / (1 + torch.exp(-z / 7.5)))


def test_value_embedding_gate(monkeypatch):
    """v + 2*sigmoid(W x[:gate_dims]) * ve per head; zero W gives v + ve."""
    cfg = small().model
    model = tg.GPT(cfg)
    attn = model.blocks[0].attn
    assert attn.value_gate.shape == (2, 8) and attn.value_gate.label == "value_embed_gate"
    assert model.blocks[1].attn.value_gate is None  # no value embedding on layer 1, so no gate
    seen = []
    sdpa = tg.ATTENTION_BACKENDS["sdpa"]
    monkeypatch.setitem(tg.ATTENTION_BACKENDS, "sdpa", lambda q, k, v, *a: seen.append(v) or sdpa(q, k, v, *a))
    T = 10
    g = torch.Generator().manual_seed(0)
    x, ve = torch.randn(T, 32, generator=g), torch.randn(T, 32, generator=g)
    segments = tg.make_segments(torch.tensor([0, T], dtype=torch.int32), T, T)
    ctx = model.layer_inputs(torch.zeros(T, dtype=torch.long), segments, (128, 64))
    one = torch.tensor(1.0)
    with torch.no_grad():
        attn(x, None, ctx, one, one)
        plain_v = seen[-1]
        attn(x, ve, ctx, one, one)
        torch.testing.assert_close(seen[-1], plain_v + ve.view(T, 2, 16))
        attn.value_gate.normal_(generator=g)
        attn(x, ve, ctx, one, one)
        gate = 2 * torch.sigmoid(x[:, :8] @ attn.value_gate.T)  # (T, heads)
        torch.testing.assert_close(seen[-1], plain_v + gate[..., None] * ve.view(T, 2, 16))


def test_skip_connection_token_gate():
    """Two layers without attention and with zero MLP outputs are identities, so with the second input
    embedding mixed in at layer 1 the final direction shows the skip's per-token weight:
    out = norm(r1*r0*(1 + sigmoid(s)*2*sigmoid(W x0[:8])) * x0 + lam * x02)."""
    cfg = small(num_layers=2, window_pattern="NN", value_embed_pattern="..", skip_connections=((1, 0),),
                backout_layer=-1).model
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.skip_gates.normal_(generator=g)
        model.x0_lambdas[1, 1] = 0.7
        model.scalars[model.scalar_slices["skip"]] = 0.3
    tokens = torch.randint(0, 50000, (12,), generator=g)
    cu = torch.tensor([0, 12], dtype=torch.int32)
    with torch.no_grad():
        out = model.hidden_states(tokens, cu, 12, (128, 64))
        x0, x02 = model.input_embeddings(tokens, tg.make_segments(cu, 12, 12))
        r0, r1 = model.scalar("resid")
        gate = 2 * torch.sigmoid(x0[:, :8] @ model.skip_gates[0])
        factor = r1 * r0 * (1 + torch.sigmoid(torch.tensor(0.3)) * gate)
        expected = F.rms_norm(factor[:, None] * x0 + 0.7 * x02, (32,))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_untie_copies_the_head_and_its_adam_state_and_survives_a_reload():
    cfg = small()
    model = tg.GPT(cfg.model)
    opt = optimizer_set(model, cfg, 0, 1)
    tokens = torch.randint(0, 50000, (16,), generator=torch.Generator().manual_seed(2))
    cu = torch.tensor([0, 16], dtype=torch.int32)
    for step in range(2):  # one Adam step (step 1) on the tied table
        model(tokens, tokens, cu, 16, (128, 64)).backward()
        opt.step(step, 1.0, 0.9)
    adam = opt.members[0]
    slot = {s.name: s for s in adam.slots}
    assert slot["lm_head"].exp_avg.abs().max() > 0 and (slot["untied_embed"].exp_avg == 0).all()
    assert (model.untied_embed == 0).all()  # unused while tied: no gradient, no decay (strict mask)
    tg.untie_embedding(model, opt)
    assert model.embedding_untied and torch.equal(model.untied_embed, model.lm_head)
    assert torch.equal(slot["untied_embed"].exp_avg, slot["lm_head"].exp_avg)
    assert torch.equal(slot["untied_embed"].exp_avg_sq, slot["lm_head"].exp_avg_sq)
    with torch.no_grad():  # the input now reads the untied table: changing the head leaves it alone
        before = model.input_embeddings(tokens, tg.make_segments(cu, 16, 16))[0]
        model.lm_head.mul_(2)
        torch.testing.assert_close(model.input_embeddings(tokens, tg.make_segments(cu, 16, 16))[0], before)
    fresh = tg.GPT(cfg.model)
    fresh.load_state_dict(model.state_dict())
    assert fresh.embedding_untied


def test_multi_token_loss_against_a_plain_sum():
    cfg = small(compute_dtype="float32").model
    torch.manual_seed(3)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(4)
    tokens, targets = torch.randint(0, 50000, (24,), generator=g), torch.randint(0, 50000, (24,), generator=g)
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    weights = (1.0, 0.5, 0.25)
    with torch.no_grad():
        logits = model.logits(tokens, cu, 14, (128, 64))
        expected = sum(w * F.cross_entropy(logits[:24 - k], targets[k:], reduction="sum")
                       for k, w in enumerate(weights))  # across the document boundary, as the record
        got = model(tokens, targets, cu, 14, (128, 64), target_weights=torch.tensor(weights))
        pieces = model(tokens, targets, cu, 14, (128, 64), loss_piece=7, target_weights=torch.tensor(weights))
        plain = model(tokens, targets, cu, 14, (128, 64))
        single = model(tokens, targets, cu, 14, (128, 64), target_weights=torch.tensor([1.0]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(pieces, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(single, plain, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("strict", [False, True])
def test_adam_strict_cautious_mask_leaves_zero_updates_undecayed(strict):
    head = nn.Parameter(torch.ones(4, 8))
    head.label = "lm_head"
    model = nn.Module()
    model.lm_head = head
    cfg = tg.build_config("short", adam_every=1, adam_cautious_strict=strict, adam_wd=10.0)
    opt = optimizer_set(model, cfg, 0, 1)
    head.grad = torch.zeros(4, 8)
    opt.step(0, 1.0, 0.9)
    assert bool((head.detach() == 1.0).all()) == strict


def test_training_logits_are_rounded_to_the_compute_dtype():
    model = tg.GPT(tg.build_config("test", compute_dtype="bfloat16").model)
    x = torch.randn(4, 32).bfloat16()
    assert model.head(x).dtype == torch.bfloat16  # training: bf16 as the records
    with torch.no_grad():
        assert model.head(x).dtype == torch.float32  # validation: fp32
    variant = tg.GPT(tg.build_config("test", compute_dtype="bfloat16", fp32_train_logits=True).model)
    assert variant.head(x).dtype == torch.float32


def test_cpu_variant_trains_through_the_untie_and_the_multi_token_phase(tmp_path):
    """12 scheduled steps: multi-token prediction over steps 0-1, the untie after the Adam step at 2 + 1 = 3."""
    cfg = tg.config_from_args(["--preset", "medium_2025_12_31_cpu", "--num-iterations", "12",
                               "--extension-iterations", "2", "--val-every", "0", "--log-dir", str(tmp_path),
                               "--run-id", "m1231", "--val-tokens", "4096", "--num-layers", "4",
                               "--window-pattern", "LSSL", "--value-embed-pattern", "0..0", "--skip-connections",
                               "3<1", "--backout-layer", "2", "--model-dim", "64", "--head-dim", "32"])
    schedule = tg.Schedule.of(cfg)
    assert schedule.untie_step == 4 and schedule.target_weights(0) is not None and schedule.target_weights(2) is None
    result = tg.train(cfg, [])
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < 11.0
    assert "final: val_loss:" in (tmp_path / "m1231.txt").read_text()
