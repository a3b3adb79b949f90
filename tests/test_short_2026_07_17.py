"""The short-track record #89 of 2026-07-17 as the `short_2026_07_17` preset (issue 20): each fact of
docs/record_facts/short_89_2026-07-17.md that the preset sets. The features themselves are checked against
plain computations in tests/test_short_track_features.py."""
import math

import pytest
import torch

import train_gpt as tg

BLOCK = 128


@pytest.fixture(scope="module")
def cfg():
    return tg.build_config("short_2026_07_17")


@pytest.fixture(scope="module")
def schedule(cfg):
    return tg.Schedule.of(cfg)


@pytest.fixture(scope="module")
def model(cfg):
    with torch.device("meta"):  # the full-size model's shapes without its 430M numbers
        return tg.GPT(cfg.model)


def test_model_layout(cfg):
    m = cfg.model
    assert (m.num_layers, m.model_dim, m.num_heads, m.head_dim, m.gate_dims) == (11, 768, 6, 128, 12)
    assert m.window_pattern == "SSSLSSNSSSL" and m.key_shift  # key shift on the long layers 3 and 10
    assert [i for i, c in enumerate(m.paired_head_pattern) if c == "P"] == [0, 2, 5, 9]
    assert [i for i, c in enumerate(m.xsa_pattern) if c == "X"] == [1, 3, 4, 7, 8, 10]
    assert {i: int(c) for i, c in enumerate(m.value_embed_pattern) if c != "."} == {1: 0, 2: 1, 8: 2, 9: 3, 10: 4}
    assert m.value_embed_init_std == 0.01 and m.value_embed_gate and m.value_embed_gate_input == "residual_and_value"
    assert (m.bigram_vocab, m.bigram_dim, m.bigram_sign_rows, m.bigram_lambda_init) == (754_560, 192, 8192, 0.05)
    assert m.residual_form == "sublayer" and m.resid_lambda_init == 1.1 and m.attention_source_layer == 7
    assert m.mudd_sources == (7, 3) and m.mudd_hidden == 64 and m.backout_layer == -1
    assert m.skip_connections == ((6, 3),) and m.skip_token_gate and m.skip_init == -1.5
    assert m.qk_group_heads == 2 and m.rotary_pairs == "adjacent" and not m.attn_out_zero_init
    assert m.qkv_init_gain == 0.5 and m.attn_scale == 0.1 and m.rotary_min_freq == 1 / 1024
    assert m.untie_embedding_frac == pytest.approx(2 / 3) and m.tie_embedding and m.input_embeds == 1
    assert (m.softcap, m.softcap_scale, m.softcap_offset) == ("sigmoid", 23.0, 5.0)
    assert m.fp8_head and m.fp8_scales == (100 / 448, 1.6 / 448, 0.75 / 448) and m.head_init_std == 0.005
    assert m.matrix_storage == "split_bfloat16" and m.fp8_mlp and m.smear_gate and m.attn_gate
    assert cfg.data.max_seq_len == 2048 and cfg.data.data_stream == "bos_aligned"
    assert cfg.data.val_tokens == 10_485_760 and cfg.loop.val_every == 250 and cfg.run.target_val_loss == 3.28


def test_parameter_shapes_at_full_size(model):
    """The record's banks, as this model holds them: 60 Q/K head-pair matrices (256 x 768), 20 V/O, 11 MLP
    layers of two 3072 x 768 matrices, 10 attention gates and 5 value-embedding gates of 6 x 12."""
    shapes = {}
    for p in model.parameters():
        shapes.setdefault(p.label, []).append(tuple(p.shape))
    assert shapes["attn"] == [(6, 256, 768), (2, 768, 768)] * 10
    assert shapes["mlp_fc"] == shapes["mlp_proj"] == [(3072, 768)] * 11
    assert shapes["attn_gate"] == [(6, 12)] * 10 and shapes["value_embed_gate"] == [(6, 12)] * 5
    assert shapes["value_embed"] == [(50_304, 768)] * 5 and shapes["lm_head"] == [(50_304, 768)]
    assert shapes["bigram_embed"] == [(754_560, 192)] and shapes["untied_embed"] == [(50_304, 768)]
    assert shapes["mudd_w1"] == [(2, 64, 768)] and shapes["mudd_w2"] == [(2, 14, 64)] and shapes["mudd_b2"] == [(2, 14)]
    assert shapes["resid_lambdas"] == shapes["post_lambdas"] == [(11, 2)] and shapes["bigram_lambdas"] == [(11,)]
    assert shapes["xsa"] == [(6,)] * 6 and shapes["smear_gate"] == shapes["skip_gate"] == [(1, 12)]
    assert model.bigram_signs.shape == (8192, 192) and "embed" not in shapes


def test_optimiser_settings(cfg, model):
    o, labels = cfg.optim, cfg.optim.labels
    assert (o.optimizer, o.muon_lr, o.muon_wd, o.normuon_beta2, o.orthogonalizer, o.muon_shape_factor) == (
        "normuon", 0.023, 1.2, 0.9, "polar_express", "matrix")
    assert o.orthogonalize_split_update == ("mlp_fc", "mlp_proj")  # the record's large (3072-row) matrices
    assert (o.adam_lr, o.adam_eps, o.adam_wd, o.adam_every, o.adam_moment_dtype) == (0.008, 1e-10, 0.005, 2, "float32")
    assert o.adam_cautious_strict and o.adam_eps_before_correction and not o.adam_wd_linear_lr_mult
    record = {  # label: (lr multiplier, wd multiplier, betas), section 5.1 of the facts
        "scalars": (5, 0, (0.9, 0.99)), "smear_gate": (0.01, 0, (0.9, 0.99)), "skip_gate": (0.05, 0, (0.9, 0.99)),
        "attn_gate": (1, 1, (0.9, 0.99)), "value_embed_gate": (1, 1, (0.9, 0.99)), "lm_head": (1, 150, (0.5, 0.95)),
        "bigram_embed": (75, 5, (0.75, 0.95)), "post_lambdas": (1, 0, (0.9, 0.95)), "x0_lambdas": (1, 0, (0.9, 0.95)),
        "bigram_lambdas": (1, 0, (0.9, 0.95)), "resid_lambdas": (5, 0, (0.9, 0.95)), "xsa": (1, 0, (0.9, 0.95)),
        "value_embed": (75, 5, (0.75, 0.95)), "untied_embed": (1, 150, (0.5, 0.95)), "mudd_w1": (0.25, 1, (0.9, 0.99)),
        "mudd_w2": (0.25, 1, (0.9, 0.99)), "mudd_b2": (0.25, 0, (0.9, 0.99))}
    assert {k: (labels[k].lr, labels[k].wd, labels[k].betas) for k in record} == record
    assert all(labels[k].optimizer == "adam" for k in record)
    assert {k: (labels[k].optimizer, labels[k].lr) for k in ("attn", "mlp_fc", "mlp_proj")} == {
        "attn": ("muon", 1.0), "mlp_fc": ("muon", 1.0), "mlp_proj": ("muon", 2.0)}
    assert {p.label for p in model.parameters()} == set(record) | {"attn", "mlp_fc", "mlp_proj"}


def test_batch_window_and_sequence_stages(schedule):
    """Thirds of 1380 steps plus 10: 131k/262k/393k tokens, max sequence 896 then 2048, windows (long, short)
    in blocks (3, 1), (7, 3), (11, 5), extension (13, 6), final validation (20, 6)."""
    assert schedule.total_steps == 1390
    starts = [0, 460, 920, 1380]
    assert [schedule.batch_tokens(s) for s in starts] == [131_072, 262_144, 393_216, 393_216]
    assert [schedule.max_seq_len(s) for s in starts] == [896, 2048, 2048, 2048] and schedule.max_seq_len(459) == 896
    assert [tuple(w // BLOCK for w in schedule.windows(s)) for s in starts] == [(3, 1), (7, 3), (11, 5), (13, 6)]
    assert schedule.final_val_windows() == (20 * BLOCK, 6 * BLOCK)
    grew = {s: schedule.at(s).window_grew_from // BLOCK for s in range(1390) if schedule.at(s).window_grew_from}
    assert grew == {460: 3, 920: 7, 1380: 11}


def test_lr_stages_start_with_the_batch_stage_then_cool_to_0_15(schedule):
    """s = 1.0, 1.52, 1.73 by batch stage (step 460 already 1.52); from step 552 = 0.4 * 1380,
    s = stage * (1 - t) + 0.15 t with t = (step - 552) / 828; 0.15 through the extension."""
    lr = schedule.lr_multiplier
    assert [lr(s) for s in (0, 459, 460, 552)] == [1.0, 1.0, 1.52, 1.52]
    for step, stage in ((600, 1.52), (919, 1.52), (920, 1.73), (1379, 1.73)):
        t = (step - 552) / 828
        assert lr(step) == pytest.approx(stage * (1 - t) + 0.15 * t)
    assert lr(920) == pytest.approx(1.0278, abs=1e-4) and lr(1380) == lr(1389) == 0.15


def test_momentum_warms_up_over_300_steps_and_cools_over_the_last_50(schedule):
    assert schedule.momentum(0) == 0.85 and schedule.momentum(150) == pytest.approx(0.90)
    assert schedule.momentum(300) == schedule.momentum(1340) == 0.95
    assert schedule.momentum(1389) == pytest.approx(0.852)


def test_multi_token_weights_and_the_untie(schedule):
    """MTP: [1, 0.5, 0.25(1 - t)] in stage 0, [1, 0.5(1 - t)] in stage 1, then next-token only. Untie after
    the Adam step 920 | 1 = 921: from step 922 the input table is separate, with the head's Adam state."""
    w = schedule.target_weights
    assert w(0) == (1.0, 0.5, 0.25) and w(230) == pytest.approx((1.0, 0.5, 0.125))
    assert w(690) == pytest.approx((1.0, 0.25)) and w(920) is None and w(1389) is None
    assert schedule.untie_step == 922
    assert [s for s in range(schedule.total_steps) if schedule.at(s).untie_embedding] == [922]


def test_yarn_attention_scale_sequence():
    """0.1 -> 0.116946 -> 0.127518 -> 0.131778 as the long window grows 3 -> 7 -> 11 -> 13 blocks."""
    model = tg.GPT(tg.build_config("test", window_block=BLOCK).model)
    scales = [float(model.attn_scale)]
    for old, new in ((3, 7), (7, 11), (11, 13)):
        model.rescale_rotary(old * BLOCK, new * BLOCK)
        scales.append(float(model.attn_scale))
    assert scales == pytest.approx([0.1, 0.116946, 0.127518, 0.131778], abs=1e-6)


def test_cpu_variant_trains(tmp_path):
    """The recipe at CPU size, 12 + 2 steps: multi-token prediction, the untie after step 9, every feature on."""
    cfg = tg.config_from_args(["--preset", "short_2026_07_17_cpu", "--num-iterations", "12",
                               "--extension-iterations", "2", "--val-every", "0", "--log-dir", str(tmp_path),
                               "--run-id", "s89", "--val-tokens", "4096", "--model-dim", "64", "--head-dim", "32",
                               "--bigram-dim", "16"])
    schedule = tg.Schedule.of(cfg)
    assert schedule.untie_step == 10 and schedule.target_weights(0) is not None and schedule.target_weights(8) is None
    result = tg.train(cfg, [])
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < 10.5
    assert "final: val_loss:" in (tmp_path / "s89.txt").read_text()


def test_lookup_tables_are_not_counted_as_matmul_flops(cfg, model):
    """The bigram table and the untied input table are read by index: MFU must not count them as matmuls."""
    with torch.device("meta"):
        smaller = tg.GPT(tg.build_config("short_2026_07_17", bigram_vocab=1000, untie_embedding_frac=0.0).model)
    assert tg.matmul_flops_per_token(model, 2048, 1408) == tg.matmul_flops_per_token(smaller, 2048, 1408)
