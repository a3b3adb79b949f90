"""Features of the short track after the 2025-12-21 record (issue 20, second part), each a switch off by
default and checked against a plain computation here; the facts are in docs/record_facts/short_89_2026-07-17.md."""
import functools
import math

import pytest
import torch

import train_gpt as tg
from conftest import optimizer_set


def test_exclude_own_value_by_hand():
    """y_h - tanh(a_h) (y_h . v_h/|v_h|) v_h/|v_h| for each token and head, written out with loops."""
    g = torch.Generator().manual_seed(0)
    y, v = torch.randn(5, 3, 8, generator=g), torch.randn(5, 3, 8, generator=g)
    alpha = torch.tensor([0.0, 0.7, -2.0])
    got = tg.exclude_own_value(y, v, alpha)
    for t in range(5):
        for h in range(3):
            unit = v[t, h] / v[t, h].norm()
            expected = y[t, h] - torch.tanh(alpha[h]) * torch.dot(y[t, h], unit) * unit
            torch.testing.assert_close(got[t, h], expected)
    torch.testing.assert_close(got[:, 0], y[:, 0])  # alpha 0: unchanged
    full = tg.exclude_own_value(y, v, torch.full((3,), 50.0))  # tanh = 1: nothing left along the own value
    assert (full * v).sum(-1).abs().max() < 1e-5


def test_xsa_layers_start_as_plain_attention_and_learn_alpha():
    base = ["--preset", "test", "--compute-dtype", "float32", "--head-init-std", "0.05"]
    plain_cfg = tg.config_from_args(base).model
    xsa_cfg = tg.config_from_args(base + ["--xsa-pattern", "X..X"]).model
    torch.manual_seed(0)
    plain = tg.GPT(plain_cfg)
    torch.manual_seed(0)
    model = tg.GPT(xsa_cfg)
    with torch.no_grad():  # non-zero attention outputs, so the layers matter
        for a, b in ((plain.blocks[i].attn, model.blocks[i].attn) for i in (0, 1, 3)):
            a.qkvo[3].normal_(std=0.1, generator=torch.Generator().manual_seed(1))
            b.qkvo[3].copy_(a.qkvo[3])
    assert [b.attn.xsa_alpha is not None for b in model.blocks if b.attn is not None] == [True, False, True]
    assert model.blocks[0].attn.xsa_alpha.label == "xsa" and model.blocks[0].attn.xsa_alpha.dtype == torch.float32
    tokens = torch.randint(0, 50000, (64,), generator=torch.Generator().manual_seed(2))
    cu = torch.tensor([0, 30, 64], dtype=torch.int32)
    torch.testing.assert_close(model.logits(tokens, cu, 34, (128, 0)), plain.logits(tokens, cu, 34, (128, 0)))
    model(tokens, tokens, cu, 34, (128, 0)).backward()
    assert model.blocks[0].attn.xsa_alpha.grad.abs().max() > 0
    with torch.no_grad():
        model.blocks[3].attn.xsa_alpha.fill_(1.0)
    assert (model.logits(tokens, cu, 34, (128, 0)) - plain.logits(tokens, cu, 34, (128, 0))).abs().max() > 1e-4


@pytest.mark.parametrize("pattern, message", [("X.", "needs one character per layer"),
                                              ("..X.", "XSA on a layer without attention")])
def test_xsa_pattern_is_checked(pattern, message):
    with pytest.raises(tg.ConfigError, match=message):
        tg.config_from_args(["--preset", "test", "--xsa-pattern", pattern])


# --- bigram hash embedding ------------------------------------------------------------------------


def test_bigram_rows_by_hand():
    tokens = torch.tensor([50256, 7, 50303, 0, 7, 7])
    rows, signs = tg.bigram_rows(tokens, rows=1000, sign_rows=16)
    assert rows[0] == 999 and signs[0] == 0  # no previous token: the reserved row
    for t in range(1, 6):
        assert rows[t] == ((36313 * int(tokens[t])) ^ (27191 * int(tokens[t - 1]))) % 999
        assert signs[t] == (int(tokens[t]) ^ int(tokens[t - 1])) % 16
    # The record's int32 arithmetic cannot overflow for GPT-2 ids: the largest product fits.
    assert 36313 * 50303 < 2**31


def bigram_model(**overrides):
    cfg = tg.build_config("test", compute_dtype="float32", bigram_vocab=997, bigram_dim=8, bigram_sign_rows=16,
                          **overrides).model
    torch.manual_seed(0)
    return tg.GPT(cfg)


def test_bigram_embedding_starts_at_zero_and_learns_only_the_rows_it_used():
    model = bigram_model()
    plain = tg.GPT(tg.build_config("test", compute_dtype="float32").model)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    assert set(model.bigram_signs.unique().tolist()) == {-1.0, 1.0}
    assert (model.bigram_lambdas == 0.05).all() and model.bigram_lambdas.label == "bigram_lambdas"
    tokens = torch.randint(0, 50000, (48,), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 20, 48], dtype=torch.int32)
    torch.testing.assert_close(model.logits(tokens, cu, 28, (128, 0)), plain.logits(tokens, cu, 28, (128, 0)))
    model(tokens, tokens, cu, 28, (128, 0)).backward()
    rows, _ = tg.bigram_rows(tokens, 997, 16)
    touched = model.bigram_embed.grad.abs().sum(-1) > 0
    assert touched.nonzero().flatten().tolist() == sorted(set(rows.tolist()))


@pytest.mark.parametrize("second_layer", ["N", "S"])
def test_bigram_addend_goes_into_x0_and_after_later_attention_sublayers(second_layer):
    """Two layers whose attention (zero-initialised output matrix) and MLP (zero output matrix) add nothing,
    so out = norm(r1 * r0 * x0' [+ lambda_1 * addend if layer 1 has attention]) with x0' = x0 + lambda_0 *
    addend in the leading dims: the record injects into x0, then after attention sublayers only."""
    model = bigram_model(num_layers=2, window_pattern="N" + second_layer, value_embed_pattern="..",
                         skip_connections=(), backout_layer=-1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.bigram_embed.normal_(generator=g)
        model.bigram_lambdas.copy_(torch.tensor([0.7, 3.0]))
    tokens = torch.randint(0, 50000, (16,), generator=g)
    cu = torch.tensor([0, 16], dtype=torch.int32)
    with torch.no_grad():
        out = model.hidden_states(tokens, cu, 16, (128, 0))
        x0 = model.input_embeddings(tokens, tg.make_segments(cu, 16, 16))[0]
        rows, signs = tg.bigram_rows(tokens, 997, 16)
        pairs = model.bigram_embed[rows] * model.bigram_signs[signs]
        r0, r1 = model.scalar("resid")
        x = r1 * r0 * torch.cat([x0[:, :8] + 0.7 * pairs, x0[:, 8:]], -1)
        if second_layer == "S":
            x = torch.cat([x[:, :8] + 3.0 * pairs, x[:, 8:]], -1)
        expected = torch.nn.functional.rms_norm(x, (32,))
    torch.testing.assert_close(out, expected)


def test_multi_token_weights_fade_through_the_first_two_batch_stages():
    """Short #89 (three stages): 3 targets through stage 0, 2 through stage 1, then 1; each fading weight
    falls linearly with the fraction through its stage. (The medium record's twelve stages: tests there.)"""
    schedule = tg.Schedule.of(tg.build_config("short", multi_token_prediction=True))
    assert schedule.target_weights(0) == (1.0, 0.5, 0.25)
    assert schedule.target_weights(490) == pytest.approx((1.0, 0.5, 0.25 * (1 - 0.75)))  # 3/4 through stage 0
    assert schedule.target_weights(980) == pytest.approx((1.0, 0.25))  # half way through stage 1
    assert schedule.target_weights(1307) is None and schedule.target_weights(1999) is None
    assert tg.Schedule.of(tg.build_config("short")).target_weights(0) is None  # off by default


def test_max_seq_len_follows_the_batch_stages(tmp_path, monkeypatch):
    """Short #89: sequences of at most 896 tokens in stage 0, then 2048. Here the test preset, 32 then 128:
    every training micro-batch respects its stage's limit, which is also the compiled model's max_seqlen."""
    schedule = tg.Schedule.of(tg.build_config("short", max_seq_len_stages=(896, 2048, 2048)))
    assert [schedule.at(s).max_seq_len for s in (0, 653, 654, 1999)] == [896, 896, 2048, 2048]
    assert tg.Schedule.of(tg.build_config("short")).at(0).max_seq_len == 2048  # the data's, without stages
    with pytest.raises(tg.ConfigError, match="--max-seq-len-stages"):
        tg.build_config("short", max_seq_len_stages=(4096,))
    seen = []
    loss = tg.micro_batch_loss

    def recording(model, mb, windows, max_seqlen, *args, **kwargs):
        if torch.is_grad_enabled():
            seen.append((mb.max_seqlen, max_seqlen))
        return loss(model, mb, windows, max_seqlen, *args, **kwargs)

    monkeypatch.setattr(tg, "micro_batch_loss", recording)
    cfg = tg.config_from_args(["--preset", "test", "--log-dir", str(tmp_path), "--run-id", "seq",
                               "--max-seq-len-stages", "32,128,128", "--val-every", "0"])
    tg.train(cfg, [])
    per_step = len(seen) // 14
    limits = [limit for _, limit in seen[::per_step]]
    assert limits == [32] * 4 + [128] * 10  # stages of 12 // 3 = 4 steps, then the extension
    assert all(longest <= limit for longest, limit in seen)


def test_max_seq_len_stages_must_be_integers():
    with pytest.raises(tg.ConfigError, match="--max-seq-len-stages '32,x': expects comma-separated integers"):
        tg.config_from_args(["--preset", "test", "--max-seq-len-stages", "32,x"])


# --- short #89's layer wiring: rotary pairs, value-gate input, per-sublayer residual scales, attention source --


def turn_adjacent_pairs(x, theta):
    """Dims (2j, 2j+1) of x (T, heads, dim) as the complex number x_2j + i x_2j+1, times exp(-i theta[t, j])."""
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double()) * torch.polar(torch.ones_like(theta), -theta)[:, None]
    return torch.stack([z.real, z.imag], -1).flatten(-2).float()


def test_adjacent_rotary_turns_each_pair_of_neighbouring_dims_as_a_complex_number():
    rotary = tg.Rotary(16, 1 / 1024, "adjacent")
    positions = torch.tensor([0, 1, 5, 300])
    x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(0))
    got = tg.rotate(x, rotary(positions), adjacent=True)
    theta = positions[:, None].double() * rotary.freq.double()  # (T, 8): pair j turns by position * freq_j
    torch.testing.assert_close(got, turn_adjacent_pairs(x, theta))
    # The first half of the dims rotate (4 frequencies from 1 down to 1/1024), the second half is position-free.
    torch.testing.assert_close(rotary.freq[:4], torch.tensor([1.0, 1024 ** (-1 / 3), 1024 ** (-2 / 3), 1 / 1024]))
    assert rotary.position_free_dims().tolist() == [False] * 8 + [True] * 8
    assert tg.Rotary(16, 1 / 1024).position_free_dims().tolist() == ([False] * 4 + [True] * 4) * 2


def short_89_wiring_model(**overrides):
    settings = dict(compute_dtype="float32", rotary_pairs="adjacent", attn_out_zero_init=False, value_embed_gate=True,
                    value_embed_gate_input="residual_and_value", residual_form="sublayer", attention_source_layer=1,
                    value_embed_init_std=0.5, gate_dims=4)
    cfg = tg.build_config("test", **{**settings, **overrides}).model
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every learned scale away from its initial value, so a mix-up shows
        for p in model.parameters():
            if p.label in ("resid_lambdas", "post_lambdas", "x0_lambdas", "value_embed_gate", "attn_gate"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.label.endswith("lambdas") else 0.0))
            if p.label == "mlp_proj":
                p.normal_(std=0.05, generator=g)
    return model


def test_attention_with_adjacent_rotary_and_a_gate_reading_the_value_embedding_by_hand():
    """One short-window layer in a single document, written out with plain tensor ops: adjacent rotary,
    v + 2*sigmoid(W [a[:2], ve[:2]]) * ve per head (gate_dims 4), the output gate, O like Q, K, V."""
    model = short_89_wiring_model()
    attn = model.blocks[0].attn  # window S (no key shift), value embedding table 0
    T, H, D = 24, 2, 16
    g = torch.Generator().manual_seed(3)
    a = torch.nn.functional.rms_norm(torch.randn(T, 32, generator=g), (32,))
    ve = torch.randn(T, 32, generator=g)
    tokens = torch.zeros(T, dtype=torch.long)
    cu = torch.tensor([0, T], dtype=torch.int32)
    ctx = model.layer_inputs(tokens, tg.make_segments(cu, T, T), (256, 128))
    qkv_scale, out_scale = torch.tensor(0.7), torch.tensor(1.3)
    got = attn(a, ve, ctx, qkv_scale, out_scale)

    w = attn.qkvo.detach()
    assert w[3].abs().max() > 0 and w[3].abs().max() <= math.sqrt(3) * 0.5 / math.sqrt(32)
    q, k, v = (qkv_scale * (a @ w[:3].flatten(0, 1).T)).view(T, 3, H, D).unbind(1)
    theta = torch.arange(T)[:, None].double() * model.rotary.freq.double()
    norm = lambda t: torch.nn.functional.rms_norm(t, (D,))  # noqa: E731
    q, k = turn_adjacent_pairs(norm(q), theta) * model.attn_scale, turn_adjacent_pairs(norm(k), theta)
    gate = 2 * torch.sigmoid(torch.cat([a[:, :2], ve[:, :2]], -1) @ attn.value_gate.detach().T)
    v = v + gate[..., None] * ve.view(T, H, D)
    scores = torch.einsum("thd,shd->hts", q, k)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))  # window 128 > T
    y = torch.einsum("hts,shd->thd", scores.softmax(-1), v)
    y = y * torch.sigmoid(a[:, :4] @ attn.output_gate.detach().T)[..., None]
    torch.testing.assert_close(got, out_scale * (y.reshape(T, -1) @ w[3]), atol=1e-5, rtol=1e-4)


def test_sublayer_residual_scales_and_the_attention_source_layer_by_hand():
    """x <- r_a x + p_a attention(input) + x0 lambda x0, then x <- r_m x + p_m MLP(norm x), per layer; layers
    after the source layer (1) attend over norm(its output); the layer without attention (2, 'N') takes
    the skip and its MLP only. Written as a plain loop over the model's own sublayers."""
    model = short_89_wiring_model()
    cfg = model.cfg
    assert cfg.window_pattern == "SLNL" and cfg.skip_connections == ((3, 1),) and cfg.backout_layer == 2
    assert model.resid_lambdas.label == "resid_lambdas" and "resid" not in model.scalar_slices or \
        model.scalar("resid").numel() == 0
    tokens = torch.randint(0, 50000, (40,), generator=torch.Generator().manual_seed(4))
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    windows = (128, 64)
    with torch.no_grad():
        got = model.hidden_states(tokens, cu, 23, windows)
        segments = tg.make_segments(cu, 23, 40)
        ctx = model.layer_inputs(tokens, segments, windows)
        x0 = model.input_embeddings(tokens, segments)[0]
        r, p, lam = model.resid_lambdas, model.post_lambdas, model.x0_lambdas[:, 0]
        qkv, out, skip = model.scalar("qkv"), model.scalar("out"), torch.sigmoid(model.scalar("skip"))
        norm = lambda t: torch.nn.functional.rms_norm(t, (32,))  # noqa: E731
        x, saved = x0, {}
        for i, block in enumerate(model.blocks):
            if i == 3:
                x = x + skip[0] * saved[1]
            if block.attn is not None:
                source = norm(x) if i <= 1 else norm(saved[1])
                table = block.value_embed_index
                ve = None if table is None else ctx.value_embeds[table]
                x = r[i, 0] * x + p[i, 0] * block.attn(source, ve, ctx, qkv[i], out[i]) + lam[i] * x0
            x = r[i, 1] * x + p[i, 1] * block.mlp(norm(x))
            saved[i] = x
        x = x - model.scalar("backout") * saved[2]
    torch.testing.assert_close(got, norm(x))
    # At init each layer scales the residual by sqrt(1.1) per sublayer, 1.1 per layer as the block form does.
    fresh = tg.GPT(tg.build_config("test", residual_form="sublayer").model)
    torch.testing.assert_close(fresh.resid_lambdas, torch.full((4, 2), math.sqrt(1.1)))
    assert (fresh.post_lambdas == 1).all()


def test_attention_source_layer_must_leave_a_later_layer():
    with pytest.raises(tg.ConfigError, match="--attention-source-layer 3: needs a later layer"):
        tg.config_from_args(["--preset", "test", "--attention-source-layer", "3"])


def test_qk_head_groups_keep_the_function_and_are_orthogonalised_group_by_group():
    """--qk-group-heads 2: Q and K held as one matrix per pair of heads (short #89's 256 x 768 at full size),
    V and O whole; the same initial weights and logits as the fused layout, but NorMuon (per-matrix shape
    factor, per input column for the wide pair matrices) now orthogonalises each pair on its own."""
    from test_optim import reference_muon

    def build(groups):
        cfg = tg.build_config("test", compute_dtype="float32", num_heads=4, head_dim=8, qk_group_heads=groups, attn_out_zero_init=False,
                              muon_shape_factor="matrix", muon_lr=0.05)
        torch.manual_seed(0)
        return cfg, tg.GPT(cfg.model)

    cfg, grouped = build(2)
    _, fused = build(0)
    attn, plain = grouped.blocks[0].attn, fused.blocks[0].attn
    assert attn.qk.shape == (4, 16, 32) and attn.vo.shape == (2, 32, 32) and attn.vo.normalise_columns == (False, True)
    torch.testing.assert_close(attn.qk.detach().reshape(2, 32, 32), plain.qkvo.detach()[:2])
    tokens = torch.randint(0, 50000, (40,), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    torch.testing.assert_close(grouped.logits(tokens, cu, 23, (128, 64)), fused.logits(tokens, cu, 23, (128, 64)))

    start = attn.qk.detach().clone()
    opt = optimizer_set(grouped, cfg)
    grouped(tokens, tokens, cu, 23, (128, 64)).backward()
    grad = attn.qk.grad.clone()
    opt.step(0, 1.0, 0.9)
    orth = functools.partial(tg.polar_express, dtype=torch.float32)
    expected = reference_muon(start, [grad], [1.0], [0.9], lr=0.05, wd=cfg.optim.muon_wd, label_lr=1.0, normuon=True,
                              beta2=cfg.optim.normuon_beta2, smoothing=lambda t: 0.0, orth=orth)
    torch.testing.assert_close(attn.qk.detach(), expected, rtol=1e-5, atol=1e-6)
    as_whole = reference_muon(start.reshape(2, 32, 32), [grad.reshape(2, 32, 32)], [1.0], [0.9], lr=0.05,
                              wd=cfg.optim.muon_wd, label_lr=1.0, normuon=True, beta2=cfg.optim.normuon_beta2,
                              smoothing=lambda t: 0.0, orth=orth)
    assert (as_whole.reshape(4, 16, 32) - expected).abs().max() > 1e-3  # grouping changes the update


def test_qk_group_heads_must_divide_the_heads():
    with pytest.raises(tg.ConfigError, match="--qk-group-heads 3: must divide --num-heads 2"):
        tg.config_from_args(["--preset", "test", "--qk-group-heads", "3"])


def test_paired_head_attention_by_hand():
    """A paired layer (4 heads of 8 dims, two documents, short window 6) written out with explicit indices:
    row 2t+r of the doubled sequence holds query/key head 2j+r of token t as head j and value head 2r+j,
    at position 2p+r (p the token's position in its document); a query sees keys of its document at most
    6 doubled positions back; token t's output head 2r+j is row 2t+r's head j."""
    model = short_89_wiring_model(num_heads=4, head_dim=8, paired_head_pattern="P...", residual_form="block",
                                  attention_source_layer=-1)
    attn = model.blocks[0].attn
    assert attn.paired and not model.blocks[1].attn.paired
    T, H, D, window = 40, 4, 8, 6
    g = torch.Generator().manual_seed(5)
    a = torch.nn.functional.rms_norm(torch.randn(T, 32, generator=g), (32,))
    ve = torch.randn(T, 32, generator=g)
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    segments = tg.make_segments(cu, 23, T)
    ctx = model.layer_inputs(torch.zeros(T, dtype=torch.long), segments, (128, window))
    qkv_scale, out_scale = torch.tensor(0.7), torch.tensor(1.3)
    got = attn(a, ve, ctx, qkv_scale, out_scale)

    w = attn.qkvo.detach()
    norm = lambda t: torch.nn.functional.rms_norm(t, (D,))  # noqa: E731
    q, k, v = (qkv_scale * (a @ w[:3].flatten(0, 1).T)).view(T, 3, H, D).unbind(1)
    q, k = norm(q), norm(k)
    gate = 2 * torch.sigmoid(torch.cat([a[:, :2], ve[:, :2]], -1) @ attn.value_gate.detach().T)
    v = v + gate[..., None] * ve.view(T, H, D)
    q2, k2, v2 = (torch.zeros(2 * T, H // 2, D) for _ in range(3))
    position, document = torch.zeros(2 * T, dtype=torch.long), torch.zeros(2 * T, dtype=torch.long)
    for t in range(T):
        for r in range(2):
            position[2 * t + r], document[2 * t + r] = 2 * int(segments.position[t]) + r, int(segments.seq_id[t])
            for j in range(H // 2):
                q2[2 * t + r, j], k2[2 * t + r, j], v2[2 * t + r, j] = q[t, 2 * j + r], k[t, 2 * j + r], v[t, 2 * r + j]
    theta = position[:, None].double() * model.rotary.freq.double()
    q2, k2 = turn_adjacent_pairs(q2, theta) * model.attn_scale, turn_adjacent_pairs(k2, theta)
    back = position[:, None] - position[None, :]
    allowed = (document[:, None] == document[None, :]) & (back >= 0) & (back <= window)
    scores = torch.einsum("thd,shd->hts", q2, k2).masked_fill(~allowed, float("-inf"))
    y2 = torch.einsum("hts,shd->thd", scores.softmax(-1), v2)
    y = torch.zeros(T, H, D)
    for t in range(T):
        for r in range(2):
            for j in range(H // 2):
                y[t, 2 * r + j] = y2[2 * t + r, j]
    y = y * torch.sigmoid(a[:, :4] @ attn.output_gate.detach().T)[..., None]
    torch.testing.assert_close(got, out_scale * (y.reshape(T, -1) @ w[3]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("settings, message", [
    (["--paired-head-pattern", "P.."], "needs one character per layer"),
    (["--paired-head-pattern", "...P"], "layer 3: a paired layer needs attention, without XSA or the key shift"),
    (["--paired-head-pattern", "..P."], "layer 2: a paired layer needs attention"),
    (["--paired-head-pattern", "P...", "--xsa-pattern", "X..."], "layer 0: a paired layer needs attention, without XSA"),
])
def test_paired_head_pattern_is_checked(settings, message):
    with pytest.raises(tg.ConfigError, match=message):
        tg.config_from_args(["--preset", "test", *settings])


# --- MUDD dynamic dense connections -------------------------------------------------------------------


def mudd_pair(**overrides):
    """A 4-layer MUDD model (sources: layer 1, the attention source, and layer 0, the skip source) and the
    static model it starts as: a 0.5 backout of layer 1, and twice the last layer's value embedding (MUDD
    weighs it 2 at the start, twice what an ungated or zero-init gated value embedding gets)."""
    common = dict(compute_dtype="float32", residual_form="sublayer", attention_source_layer=1,
                  value_embed_pattern="0..1", skip_connections=((2, 0),), bigram_vocab=997, bigram_dim=8, bigram_sign_rows=16,
                  value_embed_init_std=0.5, attn_out_zero_init=False, **overrides)
    torch.manual_seed(0)
    mudd = tg.GPT(tg.build_config("test", mudd_sources=(1, 0), backout_layer=-1, **common).model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-zero bigram rows and MLP outputs, so every path carries something
        mudd.bigram_embed.normal_(generator=g)
        for block in mudd.blocks:
            block.mlp.proj.normal_(std=0.05, generator=g)
    static = tg.GPT(tg.build_config("test", backout_layer=1, **common).model)
    state = {k: v for k, v in mudd.state_dict().items() if k in static.state_dict() and k != "scalars"}
    static.load_state_dict(state, strict=False)
    with torch.no_grad():
        for name in ("qkv", "out", "skip", "smear"):
            static.scalar(name).copy_(mudd.scalar(name))
        static.value_embeds[1].mul_(2)
    return mudd, static


def test_mudd_starts_as_the_static_path_with_a_backout():
    mudd, static = mudd_pair()
    assert mudd.mudd_w1.shape == (2, 64, 32) and mudd.mudd_w2.shape == (2, 14, 64) and (mudd.mudd_w2 == 0).all()
    assert [p.label for p in (mudd.mudd_w1, mudd.mudd_w2, mudd.mudd_b2)] == ["mudd_w1", "mudd_w2", "mudd_b2"]
    tokens = torch.randint(0, 50000, (40,), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    torch.testing.assert_close(mudd.hidden_states(tokens, cu, 23, (128, 64)),
                               static.hidden_states(tokens, cu, 23, (128, 64)), rtol=1e-5, atol=1e-5)
    mudd(tokens, tokens, cu, 23, (128, 64)).backward()
    assert mudd.mudd_w2.grad.abs().amax(dim=(1, 2)).min() > 0  # both coefficient MLPs learn from the start


def test_mudd_last_layer_and_final_mix_by_hand():
    """Random coefficient MLPs; the last layer and the mix after it written out from the record's formulas."""
    mudd, _ = mudd_pair()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        mudd.mudd_w2.normal_(generator=g)
        mudd.mudd_b2.normal_(generator=g)
    tokens = torch.randint(0, 50000, (40,), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    norm = lambda t: torch.nn.functional.rms_norm(t, (32,))  # noqa: E731
    with torch.no_grad():
        got = mudd.hidden_states(tokens, cu, 23, (128, 64))
        segments = tg.make_segments(cu, 23, 40)
        ctx = mudd.layer_inputs(tokens, segments, (128, 64))
        captured = {}
        for i in (0, 1, 2):  # the outputs of layers 0..2 as the model computes them
            mudd.blocks[i].register_forward_hook(lambda m, args, out, i=i: captured.__setitem__(i, out))
        mudd.hidden_states(tokens, cu, 23, (128, 64))
        x0 = mudd.input_embeddings(tokens, segments)[0]
        rows, signs = tg.bigram_rows(tokens, 997, 16)
        bigram = mudd.bigram_embed[rows] * mudd.bigram_signs[signs]
        x0 = torch.cat([x0[:, :8] + mudd.bigram_lambdas[0] * bigram, x0[:, 8:]], -1)

        def coefficients(x, which, n):
            hidden = torch.nn.functional.gelu(x @ mudd.mudd_w1[which].T)
            return 0.1 * (hidden @ mudd.mudd_w2[which, :n].T + mudd.mudd_b2[which, :n])

        x, a, b = captured[2], captured[1], captured[0]
        c = coefficients(x, 0, 14).T[..., None]  # c[k]: (T, 1)
        ve = ctx.value_embeds[1].view(40, 2, 16)  # the last layer's table (pattern 0..1), 2 heads
        addend = c[0] * x0 + c[1] * a + c[2] * x + torch.cat([c[6] * ve[:, 0], c[7] * ve[:, 1]], -1)
        y = (1 + c[5]) * x + c[3] * x0 + c[4] * a
        block = mudd.blocks[3]
        attended = block.attn(norm(a), None, ctx, mudd.scalar("qkv")[3], mudd.scalar("out")[3], addend)
        y = c[8] * y + c[9] * attended + c[10] * x0
        y = torch.cat([y[:, :8] + c[11] * bigram, y[:, 8:]], -1)
        y = c[12] * y + c[13] * block.mlp(norm(y))
        n = coefficients(y, 1, 5).T[..., None]
        y = y + n[0] * x0 + n[1] * a + n[2] * x + n[3] * ctx.value_embeds[0] + n[4] * b
    torch.testing.assert_close(got, norm(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("settings, message", [
    (["--mudd-sources", "1"], "needs two layers a,b before the last"),
    (["--mudd-sources", "1,0"], "needs --residual-form sublayer"),
    (["--mudd-sources", "1,0", "--residual-form", "sublayer"], "replaces the backout"),
])
def test_mudd_sources_are_checked(settings, message):
    with pytest.raises(tg.ConfigError, match=message):
        tg.config_from_args(["--preset", "test", *settings])


def test_split_bfloat16_storage_truncates_the_fp32_master_in_the_forward():
    """--matrix-storage split_bfloat16: a bfloat16 forward reads the upper 16 bits of each fp32 matrix (the
    record's bf16 part of bf16 + 16-bit remainder), the gradient reaches the fp32 master unchanged, and the
    initial matrices are bfloat16 numbers. float32 storage rounds to nearest instead."""
    split = tg.GPT(tg.build_config("test", compute_dtype="bfloat16", matrix_storage="split_bfloat16").model)
    for p in split.blocks.parameters():
        if p.label in ("attn", "mlp_fc", "mlp_proj"):
            assert p.dtype == torch.float32 and torch.equal(p, p.bfloat16().float()), p.label
    rounded = tg.GPT(tg.build_config("test", compute_dtype="bfloat16").model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32, generator=g).bfloat16()
    fc, proj = torch.randn(128, 32, generator=g), torch.randn(128, 32, generator=g) * 0.1
    for model in (split, rounded):
        with torch.no_grad():
            model.blocks[0].mlp.fc.copy_(fc)
            model.blocks[0].mlp.proj.copy_(proj)
    out = split.blocks[0].mlp(x)
    out.float().square().sum().backward()

    def truncated(w):
        return torch.tensor([float(torch.tensor(int(i) & ~0xFFFF, dtype=torch.int32).view(torch.float32))
                             for i in w.view(torch.int32).flatten()]).view_as(w).bfloat16()

    fc16, proj16 = truncated(fc).requires_grad_(), truncated(proj).requires_grad_()
    expected = torch.relu(x @ fc16.T).square() @ proj16
    expected.float().square().sum().backward()
    assert torch.equal(out, expected)
    assert torch.equal(split.blocks[0].mlp.fc.grad, fc16.grad.float())
    assert not torch.equal(rounded.blocks[0].mlp(x), out)  # rounding to nearest is another forward


# --- FP8 MLP with delayed scaling (the GPU path; torch._scaled_mm has a CPU kernel) ----------------------


def e4m3(t):
    return t.float().to(torch.float8_e4m3fn).float()


def fp8_mlp_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 64, generator=g).bfloat16()
    fc = (torch.randn(256, 64, generator=g) * 0.1).bfloat16()
    proj = (torch.randn(256, 64, generator=g) * 0.05).bfloat16()
    return x, fc, proj


def relative_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("activation_scale", [0.05, 1e-4])
def test_fp8_mlp_forward_against_a_quantise_dequantise_reference(activation_scale):
    """Up projection: x and fc by their own amax/448; down projection: the activation by the given (delayed)
    scale, saturating at 448 (the small scale saturates most of it), proj by its scale, clamped to +-448."""
    x, fc, proj = fp8_mlp_inputs()
    a_scale, p_scale = torch.tensor(activation_scale), torch.tensor(float(proj.float().abs().max()) / 448 * 0.5)
    out, pre, post, amax = tg.fp8_mlp(x, fc, proj, a_scale, p_scale)
    x_s, fc_s = x.float().abs().max() / 448, fc.float().abs().max() / 448
    pre_ref = (e4m3(x.float() / x_s) * x_s @ (e4m3(fc.float() / fc_s) * fc_s).T).bfloat16()
    post_ref = torch.relu(pre_ref).square()
    post_q = e4m3((post_ref.float() / a_scale).clamp(max=448)) * a_scale
    proj_q = e4m3((proj.float() / p_scale).clamp(-448, 448)) * p_scale
    assert relative_error(pre, pre_ref) < 1e-2 and relative_error(post, post_ref) < 2e-2
    assert relative_error(out, post_q @ proj_q) < 1e-2
    assert out.dtype == pre.dtype == post.dtype == torch.bfloat16
    assert float(amax) == float(post.float().abs().max())
    if activation_scale < 1e-3:  # saturated: far from the unquantised product
        assert relative_error(out, post_ref.float() @ proj.float()) > 0.5


def test_fp8_mlp_backward_is_the_bf16_gradient_at_the_fp8_activations():
    x, fc, proj = fp8_mlp_inputs(1)
    grad = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    leaves = [t.clone().requires_grad_() for t in (x, fc, proj)]
    out, pre, _, _ = tg.fp8_mlp(*leaves, torch.tensor(0.01), torch.tensor(0.001))
    out.backward(grad)
    # Reference: a bf16 MLP whose pre-activation is replaced (straight through) by the FP8 forward's.
    ref = [t.clone().requires_grad_() for t in (x, fc, proj)]
    pre_bf16 = ref[0] @ ref[1].T
    post = torch.relu(pre_bf16 + (pre.detach() - pre_bf16).detach()).square()
    (post @ ref[2]).backward(grad)
    for got, expected in zip(leaves, ref):
        assert relative_error(got.grad, expected.grad) < 1e-2


def test_fp8_mlp_delayed_scales(monkeypatch):
    """The activation scale is the previous training forward's amax x 1.80/448 (1 at first; validation
    leaves it); the down projection's weight scale is the current amax/448 for steps 0-15, then the amax
    measured after the previous step x 1.12/448."""
    monkeypatch.setattr(tg, "fp8_supported", lambda x: x.size(0) % 16 == 0)
    mlp = tg.MLP(tg.build_config("test", fp8_mlp=True).model)
    assert float(mlp.fp8_activation_scale) == 1.0 and float(mlp.fp8_proj_scale) == pytest.approx(1e-12 / 448)
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mlp(x)  # validation: bf16, no scale update
    assert float(mlp.fp8_activation_scale) == 1.0
    with torch.no_grad():
        mlp.fc.mul_(10)
    hidden = torch.relu(x @ mlp.fc.T).square()
    mlp(x).sum().backward()
    expected = float(hidden.detach().abs().max()) * 1.80 / 448
    assert float(mlp.fp8_activation_scale) == pytest.approx(expected, rel=0.1)
    amaxes = []
    for step in range(18):
        with torch.no_grad():
            mlp.proj.copy_(torch.full_like(mlp.proj, 0.01 * (step + 1)))
        amaxes.append(0.01 * (step + 1))
        mlp.refresh_fp8_proj_scale(step)
        expected = amaxes[step] / 448 if step < 16 else amaxes[step - 1] * 1.12 / 448
        assert float(mlp.fp8_proj_scale) == pytest.approx(expected, rel=1e-2), step
    assert float(mlp.fp8_proj_next_scale) == pytest.approx(amaxes[-1] * 1.12 / 448, rel=1e-2)


@pytest.mark.slow
def test_fp8_mlp_trains_and_refreshes_its_scales_after_every_optimiser_step(tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "fp8_supported", lambda x: x.size(0) % 16 == 0)
    refreshed = []
    original = tg.MLP.refresh_fp8_proj_scale
    monkeypatch.setattr(tg.MLP, "refresh_fp8_proj_scale", lambda self, step: refreshed.append(step) or original(self, step))
    cfg = tg.config_from_args(["--preset", "test", "--fp8-mlp", "true", "--log-dir", str(tmp_path), "--run-id", "f8",
                               "--val-every", "0", "--num-iterations", "6", "--extension-iterations", "0"])
    result = tg.train(cfg, [])
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < 10.6  # from ln(50304) = 10.83
    steps = tg.Schedule.of(cfg).total_steps
    assert refreshed == [0] * 4 + [s for s in range(steps) for _ in range(4)]  # 4 layers: at init, then each step


# --- prefix-token auxiliary loss (short #88) ---------------------------------------------------------------


def test_gpt2_prefix_table_names_each_tokens_longest_proper_prefix_token():
    import tiktoken
    encoding = tiktoken.get_encoding("gpt2")
    table = tg.gpt2_prefix_tokens(50304)
    vocabulary = {encoding.decode_single_token_bytes(i): i for i in range(50256)}
    for token in list(range(0, 50256, 97)) + [encoding.encode_single_token(" the")]:
        text = encoding.decode_single_token_bytes(token)
        prefixes = [vocabulary[text[:n]] for n in range(1, len(text)) if text[:n] in vocabulary]
        assert int(table[token]) == (prefixes[-1] if prefixes else -1), text
    assert encoding.decode([int(table[encoding.encode_single_token(" the")])]) == " th"
    assert (table[50256:] == -1).all() and table[encoding.encode_single_token("a")] == -1  # one byte: no prefix


def test_prefix_token_loss_adds_the_weighted_prefix_cross_entropy():
    cfg = tg.build_config("test", compute_dtype="float32", prefix_token_weight=0.25, head_init_std=0.05).model
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    tokens = torch.randint(0, 50256, (40,), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 50256, (40,), generator=torch.Generator().manual_seed(2))
    targets[:3] = torch.tensor([0, 50256, 262])  # a single byte and the end-of-text token have no prefix
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    with torch.no_grad():
        plain = model(tokens, targets, cu, 23, (128, 64))
        with_prefix = model(tokens, targets, cu, 23, (128, 64), prefix_weight=torch.tensor(0.3))
        logits = model.logits(tokens, cu, 23, (128, 64)).double()
    prefix = model.prefix_tokens[targets]
    assert prefix[0] == -1 and prefix[1] == -1 and prefix[2] >= 0
    extra = sum(float(logits[t].logsumexp(-1) - logits[t, prefix[t]]) for t in range(40) if prefix[t] >= 0)
    assert float(with_prefix - plain) == pytest.approx(0.3 * extra, rel=1e-4)


def test_prefix_token_weight_schedule_and_vocabulary_check():
    schedule = tg.Schedule.of(tg.build_config("short", prefix_token_weight=0.25, num_iterations=1365))
    w = schedule.prefix_weight
    assert w(0) == w(454) == 0.25 and w(455) == pytest.approx(0.25) and w(682) == pytest.approx(0.25 * (1 - 227 / 455))
    assert w(910) is None and w(1374) is None and tg.Schedule.of(tg.build_config("short")).prefix_weight(0) is None
    with pytest.raises(tg.ConfigError, match="--prefix-token-weight 0.25: the prefix table is GPT-2's"):
        tg.config_from_args(["--preset", "test", "--prefix-token-weight", "0.25", "--vocab-size", "1000"])


# --- dynamically composable attention correction (short #85) -------------------------------------------------


@pytest.mark.parametrize("window, block", [(5, 4), (112, 128), (3, 16)])
def test_dc_attention_correction_against_dense_masked_maps(window, block):
    """Every head's softmax map over keys 0 <= t - s < window of t's sequence, mixed across heads by mix(t),
    applied to each head's values and weighted per head: written with full (T x T) maps."""
    g = torch.Generator().manual_seed(0)
    T, H, D = 37, 3, 8
    q, k, v = (torch.randn(T, H, D, generator=g) for _ in range(3))
    mix, weight = torch.randn(T, H, generator=g), torch.randn(T, H, generator=g)
    cu = torch.tensor([0, 11, 30, 37], dtype=torch.int32)
    segments = tg.make_segments(cu, 19, T)
    got = tg.dc_attention_correction(q, k, v, segments, mix, weight, window, block)
    back = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    same = segments.seq_id[:, None] == segments.seq_id[None, :]
    allowed = (back >= 0) & (back < window) & same
    probs = torch.einsum("thd,shd->hts", q, k).masked_fill(~allowed, float("-inf")).softmax(-1)
    expected = torch.zeros(T, H, D)
    for t in range(T):
        composed = sum(mix[t, j] * probs[j, t] for j in range(H))  # (T,) over keys
        for h in range(H):
            expected[t, h] = weight[t, h] * (composed[:, None] * v[:, h]).sum(0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_dc_attention_layer_starts_unchanged_and_learns_its_gate():
    base = dict(compute_dtype="float32", head_init_std=0.05, attn_out_zero_init=False)
    torch.manual_seed(0)
    plain = tg.GPT(tg.build_config("test", **base).model)
    torch.manual_seed(0)
    model = tg.GPT(tg.build_config("test", dc_attention_pattern="...D", **base).model)
    assert model.blocks[3].attn.dc_gate.shape == (4, 12) and model.blocks[3].attn.dc_gate.label == "dc_gate"
    tokens = torch.randint(0, 50000, (40,), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    torch.testing.assert_close(model.logits(tokens, cu, 23, (128, 64)), plain.logits(tokens, cu, 23, (128, 64)))
    model(tokens, tokens, cu, 23, (128, 64)).backward()
    assert model.blocks[3].attn.dc_gate.grad[2:].abs().max() > 0  # the w2 rows learn from the start


def test_dc_attention_pattern_is_checked():
    with pytest.raises(tg.ConfigError, match="layer 2: needs plain"):
        tg.config_from_args(["--preset", "test", "--dc-attention-pattern", "..D."])
