"""The GPT model on CPU: causality, document isolation, windows, backends, sizes, FP8 head."""
import math
import warnings

import pytest
import torch

import train_gpt as tg
from conftest import with_short

VOCAB_PAD = 50304


def make_config(*extra):
    """The test preset's model settings."""
    return tg.config_from_args(["--preset", "test", *extra]).model


def random_tokens(n, seed=0):
    return torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(seed))


def randomized_model(cfg, seed=0):
    """A model whose zero-initialised parts are made non-zero, so every path carries signal."""
    torch.manual_seed(seed)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.label in ("scalars", "x0_lambdas"):
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / math.sqrt(p.size(-1))))
    return model


def logits_of(model, tokens, cu, window=256):
    return model.logits(tokens, torch.tensor(cu, dtype=torch.int32), max(b - a for a, b in zip(cu, cu[1:])),
                        with_short(model.cfg, window))


@pytest.fixture(scope="module")
def fp32_model():
    return randomized_model(make_config("--compute-dtype", "float32"))


@pytest.fixture(scope="module")
def masked_starts_model():
    """The variant whose smear and key shift stop at document starts."""
    return randomized_model(make_config("--compute-dtype", "float32", "--mask-document-starts", "true"))


# --- causality and document isolation --------------------------------------------


def test_changing_a_token_never_changes_earlier_outputs(fp32_model):
    tokens = random_tokens(96)
    cu = [0, 96]
    base = logits_of(fp32_model, tokens, cu)
    for t in (1, 40, 95):
        changed = tokens.clone()
        changed[t] = (changed[t] + 123) % 50000
        out = logits_of(fp32_model, changed, cu)
        torch.testing.assert_close(out[:t], base[:t], rtol=0, atol=1e-5)
        assert (out[t:] - base[t:]).abs().max() > 1e-3  # the change is visible from t on


def test_documents_in_one_packed_sequence_do_not_see_each_other(masked_starts_model):
    """Attention never crosses documents; with smear and key shift stopped at document starts
    (the variant) nothing does. The record lets the previous token through (tests below)."""
    model = masked_starts_model
    tokens = random_tokens(120, seed=1)
    cu = [0, 50, 90, 120]
    base = logits_of(model, tokens, cu)
    changed = tokens.clone()
    changed[50:90] = random_tokens(40, seed=2)  # rewrite the whole middle document
    out = logits_of(model, changed, cu)
    torch.testing.assert_close(out[:50], base[:50], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[90:], base[90:], rtol=0, atol=1e-5)  # later document unaffected
    assert (out[50:90] - base[50:90]).abs().max() > 1e-3


@pytest.mark.parametrize("masked", [False, True])
def test_first_token_of_a_document_sees_the_previous_document_as_the_record(fp32_model, masked_starts_model, masked):
    """Smear gate and key shift look one token back across a document start (the record); the
    mask_document_starts variant stops both there."""
    model = masked_starts_model if masked else fp32_model
    tokens = random_tokens(64, seed=3)
    base = logits_of(model, tokens, [0, 32, 64])
    changed = tokens.clone()
    changed[31] = (changed[31] + 7) % 50000  # last token of the first document
    out = logits_of(model, changed, [0, 32, 64])
    if masked:
        torch.testing.assert_close(out[32:], base[32:], rtol=0, atol=1e-5)
    else:
        assert (out[32] - base[32]).abs().max() > 1e-3


@pytest.mark.parametrize("part", ["smear", "key_shift"])
def test_smear_and_key_shift_each_cross_a_document_start(part):
    """Each path alone carries the previous document's last token into the next document."""
    off = {"smear": ["--key-shift", "false"], "key_shift": ["--smear-gate", "false"]}[part]
    model = randomized_model(make_config("--compute-dtype", "float32", *off))
    tokens = random_tokens(64, seed=3)
    base = logits_of(model, tokens, [0, 32, 64])
    changed = tokens.clone()
    changed[31] = (changed[31] + 7) % 50000
    out = logits_of(model, changed, [0, 32, 64])
    assert (out[32:] - base[32:]).abs().max() > 1e-3


# --- attention -------------------------------------------------------------------------


def qkv(T, seed=0, heads=2, dim=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, heads, dim, generator=g) for _ in range(3)]


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_keys_beyond_the_window_have_no_influence(backend):
    """A window of w tokens: the query and the w tokens before it (w + 1 keys, FlashAttention's
    window_size=(w, 0) as the short record calls it)."""
    T, window, t = 64, 9, 50
    q, k, v = qkv(T)
    segments = tg.make_segments(torch.tensor([0, T], dtype=torch.int32), T, T)
    attend = tg.ATTENTION_BACKENDS[backend]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex attention warns that eager mode is slow
        base = attend(q, k, v, segments, window, 0.25)
        for pos, visible in ((t - window - 1, False), (t - window, True), (t, True)):
            k2, v2 = k.clone(), v.clone()
            k2[pos] += 3.0
            v2[pos] += 3.0
            out = attend(q, k2, v2, segments, window, 0.25)
            assert ((out[t] - base[t]).abs().max() > 1e-4) == visible, pos


def test_attention_backends_agree():
    T = 200
    q, k, v = qkv(T, seed=4)
    cu = torch.tensor([0, 70, 71, 150, 200], dtype=torch.int32)
    segments = tg.make_segments(cu, 79, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for window in (1, 33, 256):
            sdpa = tg.attention_sdpa(q, k, v, segments, window, 0.3)
            flex = tg.attention_flex(q, k, v, segments, window, 0.3)
            torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-4)


def test_sdpa_matches_a_plain_loop():
    T, window, scale = 40, 6, 0.5
    q, k, v = qkv(T, seed=5)
    cu = [0, 13, 40]
    out = tg.attention_sdpa(q, k, v, tg.make_segments(torch.tensor(cu, dtype=torch.int32), 27, T), window, scale)
    for t in range(T):
        start = max(t - window, 13 if t >= 13 else 0)  # window + 1 keys, never before the document
        scores = torch.einsum("hd,khd->hk", q[t], k[start:t + 1]) * scale
        expected = torch.einsum("hk,khd->hd", scores.softmax(-1), v[start:t + 1])
        torch.testing.assert_close(out[t], expected, rtol=1e-5, atol=1e-5)


def test_varlen_backend_is_refused_on_cpu():
    with pytest.raises(tg.ConfigError, match="varlen needs a CUDA device"):
        make_config("--attention-backend", "varlen", "--device", "cpu")


# --- rotary and YaRN -----------------------------------------------------------------


def test_rotary_frequencies_and_yarn_rescale():
    rotary = tg.Rotary(128, 1 / 1024)
    freq = rotary.freq.clone()
    assert freq.shape == (64,) and (freq[32:] == 0).all()
    torch.testing.assert_close(freq[:32], (1 / 1024) ** torch.linspace(0, 1, 32))
    old, new = 384, 896
    rotary.yarn_rescale(old, new, alpha=1.0, beta=32.0)
    turns = old * freq / (2 * math.pi)
    fast, slow = turns > 32, (turns < 1) & (freq > 0)
    assert fast.any() and slow.any()
    torch.testing.assert_close(rotary.freq[fast], freq[fast])  # fast dims untouched
    torch.testing.assert_close(rotary.freq[slow], freq[slow] * old / new)  # slow dims interpolated
    assert (rotary.freq[32:] == 0).all()


def test_model_rescale_changes_attention_scale_and_is_saved():
    model = tg.GPT(make_config())
    model.rescale_rotary(128, 256)
    assert model.attn_scale.item() == pytest.approx(0.1 * (1 + 0.2 * math.log(2)))
    state = model.state_dict()
    assert "attn_scale" in state and "rotary.freq" in state
    fresh = tg.GPT(make_config())
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.rotary.freq, model.rotary.freq)


def test_rotary_is_relative():
    """Shifting a whole sequence right keeps q.k dot products of the same offsets."""
    rotary = tg.Rotary(16, 1 / 1024)
    q, k, _ = qkv(20, seed=6, heads=1)
    pad = torch.zeros(5, 1, 16)
    a = (tg.rotate(q, rotary(torch.arange(20)))[12] * tg.rotate(k, rotary(torch.arange(20)))[3]).sum()
    b = (tg.rotate(torch.cat([pad, q]), rotary(torch.arange(25)))[17]
         * tg.rotate(torch.cat([pad, k]), rotary(torch.arange(25)))[8]).sum()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# --- sizes, init, gradients -------------------------------------------------------------


def count(cfg):
    with torch.device("meta"):
        model = tg.GPT(cfg.model)
    return sum(p.numel() for p in model.parameters()), model


def test_short_model_parameter_count():
    cfg = tg.config_from_args(["--preset", "short"])
    total, model = count(cfg)
    d, L = 768, 11
    embeddings = 50304 * d * (1 + 3)  # tied head/embedding + 3 value embeddings
    attention = 10 * (4 * d * d + 6 * 12)  # 10 attention layers: QKVO + output gate
    mlp = L * 2 * 4 * d * d
    scalars = 12 + L + (3 * L + 1 + 1 + 1)  # smear gate, x0 lambdas, resid/qkv/out + skip, smear, backout
    assert total == embeddings + attention + mlp + scalars
    assert sum(1 for b in model.blocks if b.attn is None) == 1 and model.blocks[6].attn is None


def test_medium_model_parameter_count():
    cfg = tg.config_from_args(["--preset", "medium"])
    total, model = count(cfg)
    d, L = 1024, 16
    embeddings = 50304 * d * (1 + 2 + 5)  # untied head, two input embeddings, 5 value embeddings
    attention = 15 * 4 * d * d
    mlp = L * 2 * 4 * d * d
    scalars = L * 2 + 3 * L + 3  # x0 lambdas for two embeddings, resid/qkv/out, three skips
    assert total == embeddings + attention + mlp + scalars
    assert model.blocks[7].attn is None


def test_every_parameter_has_an_optimiser_label():
    for preset in ("short", "medium", "test"):
        _, model = count(tg.config_from_args(["--preset", preset]))
        labels = {p.label for p in model.parameters()}
        assert labels <= set(tg.PARAMETER_LABELS) and {"lm_head", "attn", "mlp_fc", "mlp_proj"} <= labels


@pytest.mark.parametrize("softcap", ["sigmoid", "rational"])
def test_loss_at_init_is_log_vocab_with_zero_head(softcap):
    model = tg.GPT(make_config("--head-init-std", "0", "--softcap", softcap))
    tokens = random_tokens(64)
    loss = model(tokens, random_tokens(64, seed=9), torch.tensor([0, 30, 64], dtype=torch.int32), 34, (128, 0))
    assert (loss / 64).item() == pytest.approx(math.log(VOCAB_PAD), abs=1e-3)


def test_gradients_reach_every_parameter():
    for cfg in (make_config(), make_config("--input-embeds", "2", "--tie-embedding", "false",
                                           "--skip-gate", "linear", "--softcap", "rational")):
        model = randomized_model(cfg, seed=1)
        tokens = random_tokens(80)
        loss = model(tokens, random_tokens(80, seed=3), torch.tensor([0, 40, 80], dtype=torch.int32), 40, (128, 0))
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("extra, message", [
    (["--window-pattern", "SLN"], "--window-pattern 'SLN': needs one character per layer"),
    (["--window-pattern", "SLXL"], "--window-pattern 'SLXL': use S (short), L (long) or N"),
    (["--skip-connections", "1<3"], "--skip-connections '1<3': each item must be 'to<from' with from < to"),
    (["--skip-connections", "9<3"], "--skip-connections 9<3: only 4 layers"),
    (["--value-embed-pattern", "02.2"], "--value-embed-pattern '02.2': tables must be numbered 0..n-1"),
    (["--head-dim", "18"], "--head-dim 18: must be a positive multiple of 4"),
    (["--softcap", "tanh"], "--softcap 'tanh': choose one of sigmoid, rational, none"),
])
def test_bad_model_config_is_one_line_error(extra, message):
    with pytest.raises(tg.ConfigError) as info:
        make_config(*extra)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


# --- FP8 head ---------------------------------------------------------------------------


def quantized(x, scale, dtype):
    return tg.to_fp8(x, scale, dtype).float() * scale


def test_fp8_linear_matches_quantised_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(48, 64, generator=g) * 0.005).bfloat16().requires_grad_()
    xs, ws, gs = 100 / 448, 1.5 / 448, 0.75 / 448
    out = tg.fp8_linear(x, w, xs, ws, gs)[0]
    expected = quantized(x, xs, torch.float8_e4m3fn) @ quantized(w, ws, torch.float8_e4m3fn).T
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=1e-3)
    grad = torch.randn(32, 48, generator=g).bfloat16() * 0.01
    out.backward(grad)
    g8 = quantized(grad, gs, torch.float8_e5m2)
    torch.testing.assert_close(x.grad.float(), g8 @ quantized(w, ws, torch.float8_e4m3fn), rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(w.grad.float(), g8.T @ quantized(x, xs, torch.float8_e4m3fn), rtol=2e-2, atol=1e-3)
    assert x.grad.dtype == x.dtype and w.grad.dtype == w.dtype
