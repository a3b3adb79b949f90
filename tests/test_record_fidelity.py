"""The `short` and `medium` presets against facts of their records (issue 11), each checked
from the arithmetic; schedules and window key counts are in test_schedules.py."""
import warnings

import pytest
import torch

import train_gpt as tg
from conftest import Bag, labelled, optimizer_set


def short_cfg(**overrides):
    return tg.build_config("short", **overrides)


def lone_matrix_cfg(**overrides):
    """The short recipe where a lone "mlp_fc" matrix shares the attention's shape, so they share a Muon batch:
    both then need the same orthogonal update (the fused one)."""
    return short_cfg(orthogonalize_split_update=(), **overrides)


def tiny_cfg(*extra):
    return tg.config_from_args(["--preset", "test", "--compute-dtype", "float32", *extra])


# --- short track: Muon step size and decay of the fused attention weight ------------------


@pytest.mark.parametrize("shape_factor, ratio", [("parameter", 2.0), ("matrix", 1.0)])
def test_attention_step_is_twice_a_lone_matrix_step(shape_factor, ratio):
    """The record takes the shape factor of its fused (3072 x 768) QKVO: sqrt(3072/768) = 2, so
    each of Q, K, V, O moves twice as far as a lone square matrix given the same gradient."""
    dim = 32
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(dim, dim, generator=g)
    model = Bag(attn=labelled(torch.zeros(4, dim, dim), "attn"), lone=labelled(torch.zeros(dim, dim), "mlp_fc"))
    cfg = lone_matrix_cfg(muon_shape_factor=shape_factor, muon_wd=0.0)
    opt = optimizer_set(model, cfg, 0, 1)
    model.attn.grad, model.lone.grad = grad.expand(4, dim, dim).clone(), grad.clone()
    opt.step(0, 1.0, 0.95)
    lone_step = model.lone.detach()
    assert lone_step.abs().max() > 0
    for i in range(3):  # Q, K, V: normalised per row like the lone matrix, so exactly `ratio` times its step
        torch.testing.assert_close(model.attn.detach()[i], ratio * lone_step)


@pytest.mark.parametrize("shape_factor, ratio", [("parameter", 2.0), ("matrix", 1.0)])
def test_attention_decay_uses_the_same_effective_lr(shape_factor, ratio):
    """Zero gradient: the update is zero, so the cautious decay applies everywhere (update*p >= 0):
    p *= 1 - wd*lr*eff_lr with eff_lr = lr*shape factor (2 for the fused attention, 1 alone)."""
    dim = 32
    w = torch.randn(dim, dim, generator=torch.Generator().manual_seed(1))
    model = Bag(attn=labelled(w.expand(4, dim, dim).clone(), "attn"), lone=labelled(w.clone(), "mlp_fc"))
    cfg = lone_matrix_cfg(muon_shape_factor=shape_factor)
    opt = optimizer_set(model, cfg, 0, 1)
    model.attn.grad, model.lone.grad = torch.zeros(4, dim, dim), torch.zeros(dim, dim)
    opt.step(0, 1.0, 0.95)
    lr, wd = cfg.optim.muon_lr, cfg.optim.muon_wd
    torch.testing.assert_close(model.lone.detach(), w * (1 - wd * lr * lr))
    torch.testing.assert_close(model.attn.detach()[3], w * (1 - wd * lr * lr * ratio))


def test_short_preset_attention_lr_factor_at_768():
    """The preset's own shapes: the four 768 x 768 attention matrices get factor 2, a lone one 1."""
    model = Bag(attn=labelled(torch.zeros(4, 768, 768), "attn"), lone=labelled(torch.zeros(768, 768), "mlp_fc"))
    muon = optimizer_set(model, lone_matrix_cfg(), 0, 1).members[-1]
    (group,) = muon.groups  # one shape, one batch of five matrices
    assert group.lr_scale.flatten().tolist() == [2.0, 2.0, 2.0, 2.0, 1.0]


# --- short track: Adam decay ----------------------------------------------------------------


@pytest.mark.parametrize("linear", [False, True])
def test_value_embedding_row_without_gradient_is_decayed_by_the_squared_lr(linear):
    """A row absent from the batch has a zero update, so the record's mask (update*p >= 0) decays
    it: p *= 1 - wd*(lr*75)^2 = 1 - 0.005*0.6^2. The variant decays wd*lr^2*75, 75x less.
    (fp32 rows here: in bf16 a 0.18% decay is below half a unit in the last place.)"""
    rows = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    model = Bag(value_embed=labelled(rows.clone(), "value_embed"))
    cfg = short_cfg(adam_every=1, adam_moment_dtype="float32", adam_wd_linear_lr_mult=linear)
    opt = optimizer_set(model, cfg, 0, 1)
    grad = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    grad[0] = 0  # row 0 not in the batch
    model.value_embed.grad = grad
    opt.step(1, 1.0, 0.95)
    lr, wd, m = cfg.optim.adam_lr, cfg.optim.adam_wd, 75.0
    decay = wd * lr * lr * m if linear else wd * (lr * m) ** 2
    assert decay == pytest.approx(0.005 * lr * lr * 75 if linear else 0.0018)
    torch.testing.assert_close(model.value_embed.detach()[0], rows[0] * (1 - decay), rtol=1e-6, atol=0)


# --- short track: NorMuon axis, gate precision ---------------------------------------------


def test_normuon_axis_follows_the_records_orientation():
    """Per output unit: rows of Q, K, V (stored out x in), columns of O (stored transposed here),
    rows of the 6 x 12 attention gate although it is wide."""
    cfg = tiny_cfg()
    model = tg.GPT(cfg.model)
    attn = model.blocks[0].attn
    assert attn.qkvo.normalise_columns == (False, False, False, True)
    assert attn.output_gate.normalise_columns == (False,)
    muon = optimizer_set(model, cfg, 0, 1).members[-1]
    gate_group = next(g for g in muon.groups if g.params[0] is attn.output_gate)
    assert gate_group.col_moment is None and gate_group.row_moment.shape[-2:] == (gate_group.rows, 1)
    qkvo_group = next(g for g in muon.groups if g.params[0] is attn.qkvo)
    assert qkvo_group.per_column.flatten().tolist()[:4] == [False, False, False, True]


def test_gate_normalised_per_row_differs_from_per_column():
    """The axis matters for the 6 x 12 gate: the update differs from a per-column normalisation."""
    g = torch.Generator().manual_seed(4)
    grad = torch.randn(6, 12, generator=g) * torch.linspace(0.2, 3, 6)[:, None]
    updates = {}
    for columns in (False, True):
        gate = labelled(torch.zeros(6, 12), "attn_gate")
        gate.normalise_columns = (columns,)
        opt = optimizer_set(Bag(gate=gate), short_cfg(normuon_beta2=0.0), 0, 1)
        gate.grad = grad.clone()
        opt.step(0, 1.0, 0.0)
        updates[columns] = gate.detach().clone()
    row_rms = updates[False].square().mean(-1).sqrt()
    torch.testing.assert_close(row_rms, row_rms[:1].expand_as(row_rms))  # every head the same size
    assert (updates[True] - updates[False]).abs().max() > 1e-4


@pytest.mark.parametrize("fp32_gates, dtype", [(False, torch.bfloat16), (True, torch.float32)])
def test_gates_held_in_bf16_as_the_record(fp32_gates, dtype):
    model = tg.GPT(tg.config_from_args(["--preset", "test", "--fp32-gates", str(fp32_gates),
                                         "--compute-dtype", "bfloat16"]).model)
    assert model.smear_gate.dtype == dtype and model.blocks[0].attn.output_gate.dtype == dtype


def test_short_preset_is_the_record_by_default():
    cfg = tg.config_from_args(["--preset", "short"])
    assert cfg.optim.muon_shape_factor == "parameter" and not cfg.optim.adam_wd_linear_lr_mult
    model = cfg.model
    assert not model.mask_document_starts and not model.fp32_gates and model.window_granularity == "token"
    assert model.value_path == "scaled" and model.mlp_proj_layout == "transposed" and not model.fp32_head


# --- medium track -----------------------------------------------------------------------


def medium_like(*extra):
    """The test-sized model with the medium record's switches."""
    return tiny_cfg("--value-path", "normed", "--sa-lambda-init", "0.5,0.5", "--value-embed-init-std", "1",
                    "--mlp-proj-layout", "out_in", "--fp32-head", "true", "--window-granularity", "block",
                    "--muon-shape-factor", "matrix", "--optimizer", "muon",
                    "--labels", "embed.lr=96,value_embed.lr=96,scalars.lr=4.8,x0_lambdas.lr=4.8,mlp_proj.lr=1", *extra)


def test_medium_preset_switches():
    cfg = tg.config_from_args(["--preset", "medium"])
    model = cfg.model
    assert model.value_path == "normed" and model.sa_lambda_init == (0.5, 0.5) and model.value_embed_init_std == 1.0
    assert model.mlp_proj_layout == "out_in" and model.fp32_head and model.window_granularity == "block"
    assert cfg.optim.muon_shape_factor == "matrix"


def test_medium_v_path(monkeypatch):
    """v = 0.5*rms_norm(x Wv) + 0.5*ve per head (0.5*rms_norm(x Wv) without ve); no output scale."""
    cfg = medium_like().model
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    seen = []
    sdpa = tg.ATTENTION_BACKENDS["sdpa"]
    monkeypatch.setitem(tg.ATTENTION_BACKENDS, "sdpa", lambda q, k, v, *a: seen.append(v) or sdpa(q, k, v, *a))
    attn = model.blocks[0].attn
    T, heads, hd = 10, cfg.num_heads, cfg.head_dim
    x = torch.randn(T, cfg.model_dim)
    ve = torch.randn(T, heads * hd)
    segments = tg.make_segments(torch.tensor([0, T], dtype=torch.int32), T, T)
    lam = model.scalars[model.scalar_slices["qkv"]][0], model.scalars[model.scalar_slices["out"]][0]
    assert (lam[0].item(), lam[1].item()) == (0.5, 0.5)
    ctx = model.layer_inputs(torch.zeros(T, dtype=torch.long), segments, (64, 64))
    call = lambda value_embed, out_scale: attn(x, value_embed, ctx, lam[0], out_scale)  # noqa: E731
    with torch.no_grad():
        out = call(ve, lam[1])
        v_proj = (x @ attn.qkvo[2].T).view(T, heads, hd)
        normed = v_proj / v_proj.square().mean(-1, keepdim=True).add(torch.finfo(torch.float32).eps).sqrt()
        torch.testing.assert_close(seen[-1], 0.5 * normed + 0.5 * ve.view(T, heads, hd))
        call(None, lam[1])
        torch.testing.assert_close(seen[-1], 0.5 * normed)
        torch.testing.assert_close(call(ve, torch.tensor(0.5)), out)  # the "out" lambda only weighs ve
        torch.testing.assert_close(call(ve * 0, lam[1]), call(None, lam[1]))


def test_medium_value_embeddings_start_normal():
    model = tg.GPT(medium_like().model)
    for table in model.value_embeds:
        assert table.float().std().item() == pytest.approx(1.0, abs=0.01)
        assert table.float().mean().abs().item() < 0.01
    assert all((t == 0).all() for t in tg.GPT(tiny_cfg().model).value_embeds)  # short record: zeros


def test_medium_mlp_output_stored_out_in_gets_lr_factor_1():
    """The record stores the MLP output as (dim x 4 dim): shape factor 1 (not 2), same function."""
    cfg = medium_like()
    model = tg.GPT(cfg.model)
    mlp = model.blocks[0].mlp
    assert mlp.proj.shape == (cfg.model.model_dim, 4 * cfg.model.model_dim)
    muon = optimizer_set(model, cfg, 0, 1).members[-1]
    scale = {g.params[0].label: g.lr_scale.flatten()[0].item() for g in muon.groups}
    assert scale["mlp_proj"] == 1.0 and scale["mlp_fc"] == 2.0 and scale["attn"] == 1.0
    torch.manual_seed(1)
    transposed = tg.MLP(tiny_cfg().model)
    with torch.no_grad():
        transposed.fc.copy_(mlp.fc)
        mlp.proj.normal_()
        transposed.proj.copy_(mlp.proj.T)
        x = torch.randn(5, cfg.model.model_dim)
        torch.testing.assert_close(mlp(x), transposed(x))


def test_medium_head_is_fp32_and_keeps_small_updates():
    """An fp32 head keeps an Adam step far below bf16's resolution; a bf16 head rounds it away."""
    model = tg.GPT(medium_like().model)
    assert model.lm_head.dtype == torch.float32
    assert tg.GPT(tiny_cfg("--compute-dtype", "bfloat16").model).lm_head.dtype == torch.bfloat16
    for dtype, moves in ((torch.float32, True), (torch.bfloat16, False)):
        head = labelled(torch.full((4, 8), 0.5, dtype=dtype), "lm_head")
        opt = optimizer_set(Bag(lm_head=head), short_cfg(adam_every=1, adam_lr=1e-5, adam_wd=0.0), 0, 1)
        head.grad = torch.ones(4, 8, dtype=dtype)
        opt.step(1, 1.0, 0.9)
        assert bool((head.detach() != 0.5).all()) == moves


def test_medium_window_mask_small_case():
    """Block mask, 4-token blocks, window 2 blocks, documents [0, 6) and [6, 16): query t in block
    b sees causal, same-document keys in blocks b-1 and b -- written out by hand."""
    T, block, window = 16, 4, 8
    doc = [0] * 6 + [1] * 10
    expected = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        for k in range(T):
            expected[t, k] = k <= t and doc[k] == doc[t] and t // 4 - k // 4 <= 1
    pos, seq = torch.arange(T), torch.tensor(doc)
    got = tg.attention_mask_allows(pos[:, None], pos[None, :], seq[:, None], seq[None, :], window, block)
    assert torch.equal(got, expected)
    assert got[7].nonzero().flatten().tolist() == [6, 7]  # block 1, but document 1 starts at 6
    assert got[12].nonzero().flatten().tolist() == [8, 9, 10, 11, 12]  # blocks 2 and 3: 5 keys
    assert got[15].nonzero().flatten().tolist() == list(range(8, 16))  # 8 keys at the end of block 3
    # A window of 0 blocks (the medium short window while the long one is 1 block) keeps the own block.
    none = tg.attention_mask_allows(pos[:, None], pos[None, :], seq[:, None], seq[None, :], 0, block)
    assert none[15].nonzero().flatten().tolist() == [12, 13, 14, 15]


def test_block_windows_agree_across_backends():
    T = 200
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(T, 2, 16, generator=g) for _ in range(3))
    segments = tg.make_segments(torch.tensor([0, 70, 71, 150, 200], dtype=torch.int32), 79, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for window in (16, 48):
            sdpa = tg.attention_sdpa(q, k, v, segments, window, 0.3, 16)
            flex = tg.attention_flex(q, k, v, segments, window, 0.3, 16)
            torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-4)
            assert (sdpa - tg.attention_sdpa(q, k, v, segments, window, 0.3)).abs().max() > 1e-3


def test_block_windows_pick_flex_on_cuda_and_refuse_varlen():
    cuda = torch.device("cuda")
    assert tg.resolve_attention_backend("auto", cuda, "block") == "flex"
    assert tg.resolve_attention_backend("auto", cuda, "token") == "varlen"
    assert tg.resolve_attention_backend("auto", "cpu", "block") == "sdpa"
    with pytest.raises(tg.ConfigError, match="varlen has token windows only"):
        tg.build_config("medium", attention_backend="varlen", device="cuda")
