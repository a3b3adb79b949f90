"""The last record-fidelity residues (issue 19), each checked against the record's own arithmetic:
Adam's eps placement, the MLP's split orthogonal update, the FP8 head in training only, the medium
record's Adam moment dtypes and mean loss, and validation at the current step's windows."""
import math

import pytest
import torch

import train_gpt as tg
from conftest import Bag, labelled, optimizer_set


def test_presets_carry_the_records_settings():
    short, medium = tg.build_config("short"), tg.build_config("medium")
    assert short.optim.adam_eps_before_correction and not medium.optim.adam_eps_before_correction
    assert short.optim.adam_moment_dtype == "bfloat16" and medium.optim.adam_moment_dtype == "param"
    assert short.optim.orthogonalize_split_update == ("mlp_fc", "mlp_proj")
    assert short.loop.train_loss_reduction == "sum" and medium.loop.train_loss_reduction == "mean"
    assert not short.model.fp8_head_in_validation


# --- Adam: eps before the bias corrections (short) or after (medium) ---------------------------


@pytest.mark.parametrize("preset", ["short", "medium"])
def test_first_adam_step_on_a_tiny_gradient(preset):
    """g = eps = 1e-8 on the first step. Short record: m/(sqrt(v)+eps) * sqrt(1-b2)/(1-b1) with m = (1-b1)g,
    sqrt(v) = sqrt(1-b2)g -> sqrt(1-b2)/(sqrt(1-b2)+1) = 0.1827 (betas 0.65/0.95). Textbook (medium):
    m_hat/(sqrt(v_hat)+eps) = g/(g+eps) = 0.5. The medium's own eps is 1e-10, so set 1e-8 for both."""
    cfg = tg.build_config(preset, adam_eps=1e-8, adam_lr=1.0, adam_wd=0.0, adam_every=1, snoo=False,
                          adam_moment_dtype="float32", labels=dict(tg.SHORT_TRACK_LABELS))
    head = labelled(torch.zeros(4, 8), "lm_head")
    opt = optimizer_set(Bag(lm_head=head), cfg, 0, 1)
    head.grad = torch.full((4, 8), 1e-8)
    opt.step(1, 1.0, 0.9)  # step 1: an Adam step at every cadence
    r = math.sqrt(1 - 0.95)
    expected = r / (r + 1) if preset == "short" else 0.5
    torch.testing.assert_close(-head.detach(), torch.full((4, 8), expected), rtol=1e-5, atol=0)


# --- the split orthogonal update of the MLP -----------------------------------------------------


def split_polar_express_by_hand(G):
    """Polar Express in bf16 written out, with the MLP path's two roundings: C = B@X rounded, then
    C + a*X rounded (one add with alpha, as the record)."""
    X = G.bfloat16()
    X = X / (X.norm() * 1.02 + 1e-6)
    for a, b, c in tg.POLAR_EXPRESS_COEFFS:
        B = tg.gram_polynomial((X @ X.T)[None], b, c, use_triton=False)[0]
        X = torch.add(B @ X, X, alpha=a)
    return X


def test_mlp_orthogonalisation_rounds_twice_and_attention_fuses():
    G = torch.randn(24, 48, generator=torch.Generator().manual_seed(0))
    split = tg.polar_express(G[None], dtype=torch.bfloat16, split_update=True, use_triton=False)[0]
    fused = tg.polar_express(G[None], dtype=torch.bfloat16, split_update=False, use_triton=False)[0]
    by_hand = split_polar_express_by_hand(G)
    torch.testing.assert_close(split, by_hand, rtol=0, atol=0)
    assert (fused.float() - by_hand.float()).abs().max() > 1e-3  # the extra rounding is visible in bf16
    # The short preset routes MLP matrices to the split path and attention and gates to the fused one.
    model = tg.GPT(tg.build_config("test").model)
    muon = optimizer_set(model, tg.build_config("test"), 0, 1).members[-1]
    split_by_label = {p.label: g.split_update for g in muon.groups for p in g.params}
    assert split_by_label == {"attn": False, "attn_gate": False, "mlp_fc": True, "mlp_proj": True}


def test_mixed_split_settings_in_one_batch_are_refused():
    model = Bag(a=labelled(torch.zeros(8, 8), "attn"), b=labelled(torch.zeros(8, 8), "mlp_fc"))
    with pytest.raises(ValueError, match=r"shape \(8, 8\) disagree on the split orthogonal update"):
        optimizer_set(model, tg.build_config("short"), 0, 1)
    with pytest.raises(tg.ConfigError, match="--orthogonalize-split-update mlp: unknown label"):
        tg.config_from_args(["--orthogonalize-split-update", "mlp"])


# --- FP8 head: training only --------------------------------------------------------------------


@pytest.mark.parametrize("in_validation", [False, True])
def test_fp8_head_serves_training_and_not_validation(monkeypatch, in_validation):
    """torch._scaled_mm has a CPU kernel, so the FP8 head can run here once its device check allows it."""
    monkeypatch.setattr(tg, "fp8_supported", lambda x: True)
    calls = []
    fp8 = tg.fp8_linear
    monkeypatch.setattr(tg, "fp8_linear", lambda *args: calls.append(torch.is_grad_enabled()) or fp8(*args))
    cfg = tg.build_config("test", compute_dtype="bfloat16", fp8_head_in_validation=in_validation)
    model = tg.GPT(cfg.model)
    tokens = torch.randint(0, 50000, (32,), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 32], dtype=torch.int32)
    model(tokens, tokens, cu, 32, (128, 64)).backward()
    assert calls == [True]
    with torch.no_grad():
        model(tokens, tokens, cu, 32, (128, 64))
    assert calls == [True, False] if in_validation else calls == [True]


# --- medium: Adam moments follow the parameter; the loss is a mean ------------------------------


def test_medium_adam_moments_follow_the_parameter_dtype():
    cfg = tg.build_config("medium", compute_dtype="bfloat16", num_layers=2, model_dim=32, num_heads=2, head_dim=16,
                          window_pattern="LS", value_embed_pattern="0.", skip_connections=())
    model = tg.GPT(cfg.model)
    adam = optimizer_set(model, cfg, 0, 1).members[0]
    moments = {slot.name: (slot.param.dtype, slot.exp_avg.dtype, slot.exp_avg_sq.dtype) for slot in adam.slots}
    assert moments["lm_head"] == (torch.float32,) * 3  # the record's fp32 head keeps fp32 moments
    assert moments["x0_lambdas"] == (torch.float32,) * 3
    assert moments["value_embeds.0"] == (torch.bfloat16,) * 3
    short = optimizer_set(tg.GPT(tg.build_config("test", compute_dtype="bfloat16").model), tg.build_config("test"),
                          0, 1)
    assert {slot.exp_avg.dtype for member in short.members[:2] for slot in member.slots} == {torch.bfloat16}


class GradientCatcher:
    """Stands in for the OptimizerSet: keeps the gradients a step produced."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def prepare_backward(self, step, last_micro_step):
        pass

    def step(self, step, lr_multiplier, momentum):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
        self.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_train_loss_reduction_gives_the_records_gradient(reduction):
    """mean: the gradient of the mean token loss over the whole step (the medium record's per-rank mean,
    averaged over ranks); sum: the summed token losses over the micro-step count (short record)."""
    cfg = tg.build_config("test", train_loss_reduction=reduction)
    torch.manual_seed(0)
    model = tg.GPT(cfg.model)
    loader = tg.TrainLoader(cfg.data.train_files, 0, 1, slices=2, max_seq_len=cfg.data.max_seq_len,
                            bos_id=cfg.data.bos_id, repeat=True, long_documents="continue")
    micro_batches = loader.next_step(512)
    plan = tg.Schedule.of(cfg).at(0)
    catcher = GradientCatcher(model)
    tg.train_step(model, catcher, micro_batches, plan, cfg.data.max_seq_len, reduction)
    total = sum(model(mb.inputs, mb.targets, mb.cu_seqlens, cfg.data.max_seq_len, plan.windows)
                for mb in micro_batches)
    (total / (512 if reduction == "mean" else len(micro_batches))).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(catcher.grads[name], p.grad, rtol=1e-4, atol=1e-9, msg=name)


# --- validation sees the step's own windows, after its YaRN update --------------------------------


def test_validation_at_a_window_change_uses_the_new_windows_and_yarn(tmp_path, monkeypatch):
    """The test preset's long window grows at step 8 (1 -> 2 blocks of 128), a validation step (val_every 4):
    that validation runs with step 8's windows and the attention scale YaRN gave them."""
    seen = []
    evaluate = tg.evaluate

    def recording(model, batches, windows, world_size, loss_piece=0):
        raw = getattr(model, "_orig_mod", model)
        seen.append((windows, raw.attn_scale.item()))
        return evaluate(model, batches, windows, world_size, loss_piece)

    monkeypatch.setattr(tg, "evaluate", recording)
    cfg = tg.config_from_args(["--preset", "test", "--log-dir", str(tmp_path), "--run-id", "windows",
                               "--val-every", "4"])
    schedule = tg.Schedule.of(cfg)
    assert schedule.at(8).window_grew_from == 128 and schedule.windows(8) != schedule.windows(7)
    tg.train(cfg, [])
    by_step = dict(zip([0, 4, 8, 12, 14], seen, strict=True))
    assert by_step[8][0] == schedule.windows(8)
    grown = cfg.model.attn_scale * (1 + cfg.model.yarn_attn_gain * math.log(256 / 128))
    assert by_step[4][1] == pytest.approx(cfg.model.attn_scale)
    assert by_step[8][1] == pytest.approx(grown)
    assert by_step[14][0] == schedule.final_val_windows()
