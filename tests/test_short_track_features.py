"""Features of the short track after the 2025-12-21 record (issue 20, second part), each a switch off by
default and checked against a plain computation here; the facts are in docs/record_facts/short_89_2026-07-17.md."""
import pytest
import torch

import train_gpt as tg


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

    def recording(model, mb, windows, max_seqlen, loss_piece=0, target_weights=None):
        if torch.is_grad_enabled():
            seen.append((mb.max_seqlen, max_seqlen))
        return loss(model, mb, windows, max_seqlen, loss_piece, target_weights)

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
