"""Optimisers (section 5): each step against a plain reference written here, world-size
invariance over gloo processes, pause, Snoo, smoothing and exact state round trips."""
import copy
import functools
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import train_gpt as tg
from conftest import free_port, optimizer_set

VOCAB, DIM, HIDDEN, HEADS, SEQ = 70, 16, 64, 2, 8


def labelled(tensor, label, dtype=torch.float32):
    p = nn.Parameter(tensor.to(dtype))
    p.label = label
    return p


class Toy(nn.Module):
    """A tiny stand-in for the GPT with one parameter of every label and the same dtypes/layouts:
    bf16 embeddings and gates, fp32 matrices, attention Q/K/V/O stacked as (4, dim, dim)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        r = lambda *shape, std=0.3: torch.randn(*shape, generator=g) * std  # noqa: E731
        self.lm_head = labelled(r(64, DIM), "lm_head", torch.bfloat16)  # 1024 elements: sharded, no padding
        self.embed = labelled(r(64, DIM), "embed", torch.bfloat16)
        self.value_embed = labelled(r(VOCAB, DIM, std=0.1), "value_embed", torch.bfloat16)  # 70 rows: padded shards
        self.smear_gate = labelled(r(1, 12), "smear_gate", torch.bfloat16)
        self.x0_lambdas = labelled(torch.tensor([[1.0, 0.2], [0.8, 0.1]]), "x0_lambdas")
        self.scalars = labelled(torch.tensor([1.0, 0.5, 0.7, 1.1]), "scalars")
        self.attn = labelled(r(4, DIM, DIM), "attn")
        self.attn_gate = labelled(r(HEADS, 12), "attn_gate")
        self.mlp_fc = labelled(r(HIDDEN, DIM), "mlp_fc")
        self.mlp_proj = labelled(r(HIDDEN, DIM, std=0.1), "mlp_proj")

    def forward(self, tokens, targets):
        x = self.embed[tokens % 64].float() + self.lm_head[tokens % 64].float() * self.scalars[0]
        gate = torch.sigmoid(x[..., :12] @ self.smear_gate.float().T)
        x = torch.cat([x[:, :1], x[:, 1:] + self.scalars[1] * gate[:, 1:] * x[:, :-1]], dim=1)
        x0 = x
        q, k, v = (x @ self.attn[i].T for i in range(3))
        v = v + self.value_embed[tokens].float()
        scores = (q @ k.transpose(1, 2)) / math.sqrt(DIM)
        scores = scores.masked_fill(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), float("-inf"))
        y = scores.softmax(-1) @ v
        head_gate = torch.sigmoid(x[..., :12] @ self.attn_gate.T).repeat_interleave(DIM // HEADS, dim=-1)
        x = self.x0_lambdas[0, 0] * x + self.x0_lambdas[0, 1] * x0 + self.scalars[2] * (y * head_gate) @ self.attn[3]
        x = self.x0_lambdas[1, 0] * x + self.x0_lambdas[1, 1] * x0
        x = x + F.relu(x @ self.mlp_fc.T).square() @ self.mlp_proj * self.scalars[3]
        logits = x @ self.lm_head.float().T
        return F.cross_entropy(logits.view(-1, 64), targets.reshape(-1) % 64, reduction="sum")


def make_cfg(**overrides):
    """The short-track optimiser recipe, with test-friendly overrides."""
    return tg.build_config("short", **{"num_iterations": 20, **overrides})


def batch(step, slices=4, rows=2):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (slices, rows, SEQ + 1), generator=g)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def train(model, opt, steps, rank=0, world_size=1, slices=4, start=0, pause_at=None, cfg=None, before_step=None):
    """The training loop's protocol: this rank's consecutive micro-batches, loss/num_micro."""
    cfg = cfg or make_cfg()
    schedule = tg.Schedule.of(cfg)
    for step in range(start, start + steps):
        if pause_at is not None and step == pause_at[0]:
            opt.pause_scalars(pause_at[1])
        per_rank = slices // world_size
        mine = batch(step, slices)[rank * per_rank:(rank + 1) * per_rank]
        for i, (inputs, targets) in enumerate(mine):
            opt.prepare_backward(step, last_micro_step=i == len(mine) - 1)
            (model(inputs, targets) / len(mine)).backward()
        if before_step is not None:
            before_step(step)
        opt.step(step, schedule.lr_multiplier(step), schedule.momentum(step))


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Bag(nn.Module):
    """Just labelled parameters, for tests that set gradients directly."""

    def __init__(self, **tensors):
        super().__init__()
        for name, (tensor, label) in tensors.items():
            setattr(self, name, labelled(tensor, label))


def random_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g).to(p.dtype) for n, p in model.named_parameters()}


def set_grads(model, grads, accumulate=False):
    for n, p in model.named_parameters():
        if accumulate and p.grad is not None:
            p.grad += grads[n]
        else:
            p.grad = grads[n].clone()


# --- routing and configuration ----------------------------------------------------


def test_routing_by_label():
    opt = optimizer_set(Toy(), make_cfg(), 0, 1)
    adam, scalar, muon = opt.members
    names = lambda member: [slot.name for slot in member.slots]  # noqa: E731
    assert names(adam) == ["lm_head", "embed", "value_embed", "smear_gate", "x0_lambdas"]
    assert names(scalar) == ["scalars"] and opt.scalar_adam is scalar
    assert scalar.slots[0].betas == (0.9, 0.99) and all(slot.betas == (0.65, 0.95) for slot in adam.slots)
    assert isinstance(muon, tg.Muon) and muon.settings.variance_reduction
    shapes = {(g.rows, g.cols): g.count for g in muon.groups}
    assert shapes == {(DIM, DIM): 4, (HEADS, 12): 1, (HIDDEN, DIM): 2}  # Q, K, V, O are four matrices
    lr = {slot.name: slot.lr_mult for slot in adam.slots + scalar.slots}
    wd = {slot.name: slot.wd_mult for slot in adam.slots + scalar.slots}
    assert lr == {"lm_head": 1, "embed": 1, "value_embed": 75, "smear_gate": 0.01, "x0_lambdas": 5, "scalars": 5}
    assert wd == {"lm_head": 1, "embed": 1, "value_embed": 1, "smear_gate": 0, "x0_lambdas": 0, "scalars": 0}
    mlp = next(g for g in muon.groups if g.rows == HIDDEN)
    assert mlp.lr_scale.flatten().tolist() == [2.0, 4.0]  # sqrt(64/16) = 2, times 2 for mlp_proj
    adamw = optimizer_set(Toy(), make_cfg(optimizer="adamw"), 0, 1)
    assert len(adamw.members) == 1 and len(adamw.members[0].slots) == 10
    assert adamw.members[0].settings.wd_style == "decoupled" and adamw.members[0].settings.every == 1


def test_unknown_or_missing_label_names_the_parameter():
    model = Bag(w=(torch.zeros(4, 4), "mlp_fc"), mystery=(torch.zeros(3), "bias"))
    with pytest.raises(ValueError, match="'mystery'.*'bias'"):
        optimizer_set(model, make_cfg(), 0, 1)
    model = Bag(w=(torch.zeros(4, 4), "mlp_fc"))
    model.extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="'extra'.*None"):
        optimizer_set(model, make_cfg(), 0, 1)


@pytest.mark.parametrize("argv, field", [
    (["--orthogonalizer", "svd"], "--orthogonalizer"),
    (["--optimizer", "sgd"], "--optimizer"),
    (["--labels", "value_embed.betas=0.9"], "--labels"),
    (["--labels", "scalars.betas=0.9/1.5"], "--labels"),
    (["--labels", "mlp.lr=2"], "--labels"),
    (["--labels", "mlp_fc.wd:2"], "--labels"),
    (["--labels", "attn.optimizer=sgd"], "--labels"),
    (["--labels", "attn.lr=fast"], "--labels"),
    (["--adam-moment-init", "ones"], "--adam-moment-init"),
    (["--muon-smoothing", "1.0"], "--muon-smoothing"),
    (["--snoo-every", "0"], "--snoo-every"),
    (["--wd-style", "l2"], "--wd-style"),
    (["--adamw-betas", "0.9"], "--adamw-betas"),
])
def test_bad_optimiser_config_is_one_line_naming_the_field(argv, field):
    with pytest.raises(tg.ConfigError) as info:
        tg.config_from_args(argv)
    assert str(info.value).startswith(field) and "\n" not in str(info.value)


def test_label_overrides_change_one_rule_and_keep_the_rest():
    cfg = tg.config_from_args(["--labels", "value_embed.lr=80,scalars.betas=0.8/0.9,mlp_proj.optimizer=adam,"
                                           "mlp_proj.betas=0.7/0.9"])
    labels = cfg.optim.labels
    assert labels["value_embed"] == tg.LabelRule("adam", 80.0, 1.0, (0.65, 0.95))
    assert labels["scalars"].betas == (0.8, 0.9) and labels["scalars"].lr == 5.0
    assert labels["mlp_proj"] == tg.LabelRule("adam", 2.0, 1.0, (0.7, 0.9))
    assert {k: v for k, v in labels.items() if k not in ("value_embed", "scalars", "mlp_proj")} == \
        {k: v for k, v in tg.SHORT_TRACK_LABELS.items() if k not in ("value_embed", "scalars", "mlp_proj")}
    opt = optimizer_set(Toy(), cfg)
    adam = opt.members[0]
    assert [slot.name for slot in adam.slots][-1] == "mlp_proj"  # routed to Adam by the table
    assert tg.parse_label_overrides("", tg.SHORT_TRACK_LABELS) == tg.SHORT_TRACK_LABELS


def test_medium_preset_optimisers():
    cfg = tg.config_from_args(["--preset", "medium"]).optim
    lr = {label: rule.lr for label, rule in cfg.labels.items()}
    assert cfg.adam_lr == pytest.approx(1 / 320) and cfg.adam_lr * lr["embed"] == pytest.approx(0.3)
    assert cfg.adam_lr * lr["value_embed"] == pytest.approx(0.3)
    assert cfg.adam_lr * lr["scalars"] == pytest.approx(0.015) == cfg.adam_lr * lr["x0_lambdas"]
    assert {rule.betas for rule in cfg.labels.values() if rule.optimizer != "muon"} == {(0.8, 0.95)}
    assert cfg.adam_eps == 1e-10 and cfg.adam_wd == 0
    assert (cfg.optimizer, cfg.muon_lr, cfg.muon_wd) == ("muon", 0.03, 0.01)
    assert {label for label, rule in cfg.labels.items() if rule.wd != 1} == {"mlp_fc", "mlp_proj"}
    assert cfg.labels["mlp_fc"].wd == cfg.labels["mlp_proj"].wd == 2
    assert cfg.orthogonalizer == "newton_schulz_per_iteration" and cfg.muon_smoothing == 0.2
    assert cfg.snoo and cfg.snoo_every == 28 and cfg.snoo_lr == 0.68 and cfg.snoo_momentum == 0.37


# --- Muon / NorMuon against a plain per-matrix reference ------------------------------


def reference_muon(weight, grads, lr_mults, momenta, *, lr, wd, label_lr, normuon, beta2, smoothing, orth,
                   lr_rows=None, per_column=None):
    """Each matrix on its own: Nesterov momentum, orthogonalise, NorMuon, smoothing, cautious wd.
    lr_rows: the row count the lr factor sqrt(max(1, rows/cols)) uses (default: the matrix's);
    per_column: per matrix, whether NorMuon normalises columns (default: when rows < cols)."""
    weight = weight.clone().reshape(-1, *weight.shape[-2:])
    rows, cols = weight.shape[-2:]
    lr_rows = lr_rows or rows
    out = []
    for i in range(weight.size(0)):
        w, buf, smooth = weight[i], torch.zeros(rows, cols), torch.zeros(rows, cols)
        columns = rows < cols if per_column is None else per_column[i]
        second = torch.zeros(1, cols) if columns else torch.zeros(rows, 1)
        for t, (grad, lr_mult, mu) in enumerate(zip(grads, lr_mults, momenta)):
            g = grad.reshape(-1, rows, cols)[i]
            buf = torch.lerp(buf, g, 1 - mu)
            o = orth(torch.lerp(g, buf, mu), 5).float()
            if normuon:
                mean_sq = (o * o).mean(dim=0 if columns else 1, keepdim=True)
                second = beta2 * second + (1 - beta2) * mean_sq
                scaled = o / torch.sqrt(torch.clamp(second, min=1e-10))
                o = scaled * (torch.linalg.norm(o) / torch.linalg.norm(scaled))
            s = smoothing(t)
            smooth = s * smooth + (1 - s) * o
            u = smooth if smoothing(0) > 0 else o
            lr_t = lr * lr_mult
            eff_lr = lr_t * label_lr * max(1.0, lr_rows / cols) ** 0.5
            same_sign = (u * w >= 0).float()
            w = w - wd * lr_t * eff_lr * same_sign * w - eff_lr * u
        out.append(w)
    return torch.stack(out)


MUON_SHAPES = {"attn": ((4, DIM, DIM), "attn"), "gate": ((HEADS, 12), "attn_gate"),
               "fc": ((HIDDEN, DIM), "mlp_fc"), "proj": ((HIDDEN, DIM), "mlp_proj")}


@pytest.mark.parametrize("optimizer, smoothing, orth_dtype", [("normuon", None, "auto"),
                                                              ("muon", (0.5, 0.2, 2), "bfloat16")])
def test_muon_steps_match_reference(optimizer, smoothing, orth_dtype):
    """orth_dtype auto: float32 on a CPU; bfloat16 as the records compute on CUDA."""
    g = torch.Generator().manual_seed(3)
    model = Bag(**{n: (torch.randn(*shape, generator=g) * 0.3, label) for n, (shape, label) in MUON_SHAPES.items()})
    model.attn.normalise_columns, model.gate.normalise_columns = (False, False, False, True), (False,)  # as GPT sets
    start = params_of(model)
    extra = dict(muon_smoothing=smoothing[1], muon_smoothing_start=smoothing[0], muon_smoothing_steps=smoothing[2]) \
        if smoothing else {}
    cfg = make_cfg(optimizer=optimizer, muon_lr=0.05, muon_wd=3.0, orthogonalize_dtype=orth_dtype, **extra)
    opt = optimizer_set(model, cfg, 0, 1)
    steps, lr_mults, momenta = 4, [1.0, 1.5, 0.7, 1.2], [0.85, 0.9, 0.95, 0.95]
    grads = [random_grads(model, 10 + t) for t in range(steps)]
    for t in range(steps):
        set_grads(model, grads[t])
        opt.step(t, lr_mults[t], momenta[t])
        assert all(p.grad is None for p in model.parameters())
    sched = (lambda t: smoothing[0] + (smoothing[1] - smoothing[0]) * min(t / smoothing[2], 1)) if smoothing \
        else (lambda t: 0.0)
    dtype = torch.float32 if orth_dtype == "auto" else torch.bfloat16
    for name, (_, label) in MUON_SHAPES.items():
        # The record's MLP path rounds B@X before adding a*X; the others fuse the two.
        orth = functools.partial(tg.ORTHOGONALIZERS[cfg.optim.orthogonalizer], dtype=dtype,
                                 split_update=label in ("mlp_fc", "mlp_proj"))
        # The fused (4, DIM, DIM) QKVO takes its lr factor as one (4*DIM x DIM) parameter; NorMuon
        # normalises the O stored transposed per column and the wide gate per row.
        expected = reference_muon(start[name], [gr[name] for gr in grads], lr_mults, momenta, lr=0.05, wd=3.0,
                                  label_lr=2.0 if label == "mlp_proj" else 1.0, normuon=optimizer == "normuon",
                                  beta2=0.95, smoothing=sched, orth=orth,
                                  lr_rows=4 * DIM if name == "attn" else None,
                                  per_column={"attn": (False, False, False, True), "gate": (False,)}.get(name))
        got = getattr(model, name).detach().reshape(expected.shape)
        assert (got - start[name].reshape(expected.shape)).abs().max() > 0.01  # it really moved
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)


def test_normuon_rescale_keeps_norm_and_equalises_rows():
    update = torch.randn(3, 8, 4) * torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 100]).view(1, 8, 1)
    second = torch.zeros(3, 8, 1)
    out = tg.normuon_rescale(update, second, None, beta2=0.0)  # beta2 0: uses this step's mean squares
    torch.testing.assert_close(out.norm(dim=(-2, -1)), update.norm(dim=(-2, -1)))
    row_rms = out.square().mean(-1).sqrt()
    torch.testing.assert_close(row_rms, row_rms[:, :1].expand_as(row_rms))  # every row the same scale
    wide = torch.randn(2, 3, 9)
    second_wide = torch.zeros(2, 1, 9)  # rows < cols: one value per column
    tg.normuon_rescale(wide, None, second_wide, beta2=0.5)
    torch.testing.assert_close(second_wide, 0.5 * wide.square().mean(-2, keepdim=True))


def test_smoothing_on_scalar_toy_matches_hand_computation():
    """A 1x1 matrix with a constant gradient and momentum 0: every orthogonalised update is the
    same constant c, so u_t = s*u_{t-1} + (1-s)*c is computable by hand."""
    c = tg.ORTHOGONALIZERS["polar_express"](torch.ones(1, 1, 1), 5, dtype=torch.float32).item()  # auto on CPU
    for s_start, s_end, ramp, expected_sum in [(0.5, 0.5, 0, 0.5 + 0.75 + 0.875),
                                               (0.5, 0.2, 2, 0.5 + 0.825 + 0.965)]:
        # ramp: s = 0.5, 0.35, 0.2 -> u = 0.5c, 0.35*0.5c + 0.65c = 0.825c, 0.2*0.825c + 0.8c = 0.965c
        model = Bag(w=(torch.ones(1, 1), "mlp_fc"))
        cfg = make_cfg(optimizer="muon", muon_lr=0.1, muon_wd=0.0, muon_smoothing=s_end,
                       muon_smoothing_start=s_start, muon_smoothing_steps=ramp)
        opt = optimizer_set(model, cfg, 0, 1)
        for t in range(3):
            model.w.grad = torch.ones(1, 1)
            opt.step(t, 1.0, 0.0)
        assert model.w.item() == pytest.approx(1.0 - 0.1 * c * expected_sum, abs=1e-6)


# --- Adam against a plain reference --------------------------------------------------


def reference_adam(w, grads, lr_mults, steps, *, lr, betas, eps_at, wd, label_lr, label_wd, bias_correction=True,
                   first_grad=False, nested=False, cautious=True, linear_lr_mult=False, eps_before_correction=True):
    b1, b2 = betas
    w, m, v = w.clone().float(), torch.zeros_like(w).float(), torch.zeros_like(w).float()
    for t, (g, lr_mult, step) in enumerate(zip(grads, lr_mults, steps), start=1):
        g, eps = g.float(), eps_at(step)
        c1, c2 = (1 - b1**t, 1 - b2**t) if bias_correction else (1.0, 1.0)
        v = g * g if (first_grad and t == 1) else b2 * v + (1 - b2) * g * g
        if eps_before_correction:  # the short record: eps joins sqrt(v); the corrections scale the step
            denominator = (torch.sqrt(v) + eps) / math.sqrt(c2)
        else:  # textbook: eps after the corrections
            denominator = torch.sqrt(v / c2) + eps
        x = g / denominator if nested else g
        m = x if (first_grad and t == 1) else b1 * m + (1 - b1) * x
        if nested:
            u = m / c1
        elif eps_before_correction:
            u = m / (torch.sqrt(v) + eps) * math.sqrt(c2) / c1
        else:
            u = (m / c1) / (torch.sqrt(v / c2) + eps)
        lr_t = lr * lr_mult
        eff_lr = lr_t * label_lr
        if cautious:  # the record: wd * (lr * m)^2; the variant: wd * lr^2 * m
            decay = wd * label_wd * (lr_t if linear_lr_mult else eff_lr) * eff_lr
        else:
            decay = wd * label_wd * lr_t
        mask = (u * w >= 0).float() if cautious else 1.0
        w = w - decay * mask * w - eff_lr * u
    return w


ADAM_SHAPES = {"head": ((12, 5), "lm_head"), "ve": ((10, 4), "value_embed"), "x0": ((3, 2), "x0_lambdas"),
               "gate": ((1, 12), "smear_gate")}


@pytest.mark.parametrize("switches", [
    dict(),
    dict(adam_bias_correction=False),
    dict(adam_moment_init="first_grad"),
    dict(adam_bias_correction=False, adam_moment_init="first_grad"),
    dict(adam_nested_ema=True),
    dict(adam_nested_ema=True, adam_moment_init="first_grad", adam_bias_correction=False),
    dict(adam_eps=1e-3, adam_eps_schedule="linear", adam_eps_end=1e-1),
    dict(adam_eps=1e-3, adam_eps_schedule="geometric", adam_eps_end=1e-1),
    dict(adam_eps=1e-1, adam_eps_before_correction=False),
    dict(adam_eps=1e-1, adam_eps_before_correction=False, adam_nested_ema=True),
    dict(adam_wd_linear_lr_mult=True),
])
def test_adam_steps_match_reference(switches):
    g = torch.Generator().manual_seed(5)
    model = Bag(**{n: (torch.randn(*shape, generator=g) * 0.5, label) for n, (shape, label) in ADAM_SHAPES.items()})
    start = params_of(model)
    cfg = make_cfg(adam_lr=0.05, adam_wd=4.0, adam_every=1, adam_moment_dtype="float32", num_iterations=4, **switches)
    opt = optimizer_set(model, cfg, 0, 1)
    lr_mults = [1.0, 1.5, 0.5, 1.2]
    grads = [random_grads(model, 20 + t) for t in range(4)]
    for t in range(4):
        set_grads(model, grads[t])
        opt.step(t, lr_mults[t], 0.9)
    eps0, eps1 = cfg.optim.adam_eps, cfg.optim.adam_eps_end
    eps_at = {"linear": lambda s: eps0 + (eps1 - eps0) * s / 4, "geometric": lambda s: eps0 * (eps1 / eps0) ** (s / 4)
              }.get(cfg.optim.adam_eps_schedule, lambda s: eps0)
    lr_mult_of = {"lm_head": 1.0, "value_embed": 75.0, "x0_lambdas": 5.0, "smear_gate": 0.01}
    for name, (_, label) in ADAM_SHAPES.items():
        kwargs = dict(lr=0.05, betas=(0.65, 0.95), eps_at=eps_at, wd=4.0, label_lr=lr_mult_of[label],
                      label_wd=0.0 if label in ("x0_lambdas", "smear_gate") else 1.0,
                      bias_correction=cfg.optim.adam_bias_correction,
                      first_grad=cfg.optim.adam_moment_init == "first_grad",
                      nested=cfg.optim.adam_nested_ema, linear_lr_mult=cfg.optim.adam_wd_linear_lr_mult,
                      eps_before_correction=cfg.optim.adam_eps_before_correction)
        expected = reference_adam(start[name], [gr[name] for gr in grads], lr_mults, range(4), **kwargs)
        torch.testing.assert_close(getattr(model, name).detach(), expected, rtol=2e-5, atol=2e-6, msg=name)
        if name == "head" and not switches:  # the cautious mask matters at this wd, so the test can fail
            plain = reference_adam(start[name], [gr[name] for gr in grads], lr_mults, range(4),
                                   **dict(kwargs, cautious=False))
            assert (plain - expected).abs().max() > 1e-3


def test_plain_adamw_matches_reference_and_bf16_moments_are_close():
    shapes = {**ADAM_SHAPES, "fc": ((8, 4), "mlp_fc"), "s": ((5,), "scalars")}
    def make():
        g = torch.Generator().manual_seed(6)
        return Bag(**{n: (torch.randn(*shape, generator=g), label) for n, (shape, label) in shapes.items()})
    model, twin = make(), make()
    start = params_of(model)
    opt = optimizer_set(model, make_cfg(optimizer="adamw", adamw_lr=0.01, adamw_wd=2.0, adam_moment_dtype="float32"), 0, 1)
    opt_bf16 = optimizer_set(twin, make_cfg(optimizer="adamw", adamw_lr=0.01, adamw_wd=2.0), 0, 1)
    assert opt_bf16.members[0].slots[0].exp_avg.dtype == torch.bfloat16
    grads = [random_grads(model, 30 + t) for t in range(3)]
    for t in range(3):
        set_grads(model, grads[t])
        set_grads(twin, grads[t])
        opt.step(t, 1.0, 0.9)  # adamw steps every step whatever adam_every says
        opt_bf16.step(t, 1.0, 0.9)
    for name in shapes:
        expected = reference_adam(start[name], [gr[name] for gr in grads], [1.0] * 3, range(3), lr=0.01,
                                  betas=(0.9, 0.95), eps_at=lambda s: 1e-8, wd=2.0, label_lr=1.0, label_wd=1.0,
                                  cautious=False, eps_before_correction=False)
        torch.testing.assert_close(getattr(model, name).detach(), expected, rtol=2e-5, atol=2e-6, msg=name)
        torch.testing.assert_close(getattr(twin, name).detach(), expected, rtol=0, atol=2e-3, msg=name)


def test_adam_every_two_steps_sums_the_gradients():
    g = torch.Generator().manual_seed(7)
    model = Bag(head=(torch.randn(12, 5, generator=g), "lm_head"), s=(torch.randn(4, generator=g), "scalars"),
                fc=(torch.randn(8, 4, generator=g), "mlp_fc"))
    start = params_of(model)
    opt = optimizer_set(model, make_cfg(adam_every=2, adam_moment_dtype="float32", adam_lr=0.05), 0, 1)
    g0, g1 = random_grads(model, 40), random_grads(model, 41)
    set_grads(model, g0)
    opt.step(0, 1.0, 0.9)
    assert torch.equal(model.head, start["head"]) and torch.equal(model.s, start["s"])
    assert torch.equal(model.head.grad, g0["head"]) and model.fc.grad is None  # Adam keeps accumulating
    assert not torch.equal(model.fc, start["fc"])  # Muon stepped
    set_grads(model, g1, accumulate=True)
    opt.step(1, 1.5, 0.9)
    for name, label_lr, label_wd in (("head", 1.0, 1.0), ("s", 5.0, 0.0)):
        betas = (0.65, 0.95) if name == "head" else (0.9, 0.99)
        expected = reference_adam(start[name], [g0[name] + g1[name]], [1.5], [1], lr=0.05, betas=betas,
                                  eps_at=lambda s: 1e-8, wd=0.005, label_lr=label_lr, label_wd=label_wd)
        torch.testing.assert_close(getattr(model, name).detach(), expected, rtol=1e-5, atol=1e-6)
    assert model.head.grad is None and model.s.grad is None


def test_pause_drops_scalar_gradients_and_keeps_moments():
    g = torch.Generator().manual_seed(8)
    model = Bag(s=(torch.randn(6, generator=g), "scalars"), head=(torch.randn(12, 5, generator=g), "lm_head"))
    start = params_of(model)
    opt = optimizer_set(model, make_cfg(adam_every=1, adam_moment_dtype="float32", adam_lr=0.05), 0, 1)
    grads = [random_grads(model, 50 + t) for t in range(5)]
    set_grads(model, grads[0])
    opt.step(0, 1.0, 0.9)
    after_first = model.s.detach().clone()
    moments = copy.deepcopy(opt.scalar_adam.state_dict())
    opt.pause_scalars(2)
    for t in (1, 2):
        head_before = model.head.detach().clone()
        set_grads(model, grads[t])
        opt.step(t, 1.0, 0.9)
        assert torch.equal(model.s, after_first) and model.s.grad is None
        assert not torch.equal(model.head, head_before)  # the other groups go on
    state = opt.scalar_adam.state_dict()
    assert state["updates"] == 1 and state["pause_remaining"] == 0
    assert all(torch.equal(a, b) for a, b in zip(state["exp_avg"] + state["exp_avg_sq"],
                                                  moments["exp_avg"] + moments["exp_avg_sq"]))
    for t in (3, 4):
        set_grads(model, grads[t])
        opt.step(t, 1.0, 0.9)
    expected = reference_adam(start["s"], [grads[t]["s"] for t in (0, 3, 4)], [1.0] * 3, [0, 3, 4], lr=0.05,
                              betas=(0.9, 0.99), eps_at=lambda s: 1e-8, wd=0.005, label_lr=5.0, label_wd=0.0)
    torch.testing.assert_close(model.s.detach(), expected, rtol=1e-5, atol=1e-6)


# --- Snoo ----------------------------------------------------------------------


def test_snoo_on_scalar_matches_hand_computation():
    """Inner step w -= 0.1; K = 3, lr 0.68, mu 0.37; outer steps after inner steps 1, 4, 7.
    1: delta .1, b .1, d .137, slow 1 - .68*.137 = .90684
    4: delta .3, b .337, d .42469, slow .90684 - .68*.42469 = .6180508
    7: delta .3, b .42469, d .4571353, slow .6180508 - .68*.4571353 = .307198796"""
    w = torch.ones(())
    snoo = tg.Snoo([w], lr=0.68, momentum=0.37, every=3)
    seen = []
    for _ in range(8):
        w -= 0.1
        snoo.after_inner_step()
        seen.append(w.item())
    expected = [0.90684, 0.80684, 0.70684, 0.6180508, 0.5180508, 0.4180508, 0.307198796, 0.207198796]
    assert seen == pytest.approx(expected, abs=1e-6)


def test_snoo_in_the_optimiser_set_pulls_back_after_the_first_step():
    model = Bag(w=(torch.ones(1, 1), "mlp_fc"))
    opt = optimizer_set(model, make_cfg(optimizer="muon", muon_lr=0.1, muon_wd=0.0, snoo=True, snoo_every=3), 0, 1)
    c = tg.ORTHOGONALIZERS["polar_express"](torch.ones(1, 1, 1), 5, dtype=torch.float32).item()  # auto on CPU
    model.w.grad = torch.ones(1, 1)
    opt.step(0, 1.0, 0.0)
    # inner: 1 - 0.1c; outer: delta = 0.1c, d = 0.137c, w = 1 - 0.68*0.137c
    assert model.w.item() == pytest.approx(1 - 0.68 * 0.137 * c, abs=1e-6)


# --- state round trip -----------------------------------------------------------


def test_state_dict_round_trip_continues_bit_identically(tmp_path):
    cfg = make_cfg(snoo=True, snoo_every=2, muon_smoothing=0.3, muon_smoothing_start=0.6, muon_smoothing_steps=6,
                   adam_eps_schedule="linear", adam_eps_end=1e-6, adam_moment_init="first_grad")
    model = Toy()
    opt = optimizer_set(model, cfg, 0, 1)
    train(model, opt, 3, pause_at=(2, 2), cfg=cfg)  # stops mid-pair (Adam every 2) and mid-pause
    assert model.lm_head.grad is not None  # a pending accumulated gradient must be part of the state
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    train(model, opt, 4, start=3, cfg=cfg)

    resumed = Toy(seed=1)
    resumed_opt = optimizer_set(resumed, cfg, 0, 1)
    train(resumed, resumed_opt, 2, cfg=cfg)  # state that the load must overwrite completely
    saved = torch.load(tmp_path / "ck.pt", weights_only=False)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    train(resumed, resumed_opt, 4, start=3, cfg=cfg)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


# --- Muon vs SGD ----------------------------------------------------------------


def test_muon_beats_sgd_on_ill_conditioned_matrix_regression():
    """min ||W X - Y||^2 with input scales spanning 100x; best of a small lr grid for each."""
    g = torch.Generator().manual_seed(9)
    scales = torch.logspace(0, -2, 16)
    x = torch.randn(16, 256, generator=g) * scales[:, None]
    target = torch.randn(24, 16, generator=g)
    y = target @ x

    def final_loss(make_step, lr, steps=60):
        model = Bag(w=(torch.zeros(24, 16), "mlp_fc"))
        step_fn = make_step(model, lr)
        for t in range(steps):
            loss = ((model.w @ x - y) ** 2).sum() / 256
            model.w.grad = None
            loss.backward()
            step_fn(t, 1 - t / steps)  # both with a linear decay to zero
        return (((model.w @ x - y) ** 2).sum() / 256).item()

    def muon(model, lr):
        opt = optimizer_set(model, make_cfg(optimizer="muon", muon_lr=lr, muon_wd=0.0), 0, 1)
        return lambda t, mult: opt.step(t, mult, 0.9)

    def sgd(model, lr):
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
        def step(t, mult):
            opt.param_groups[0]["lr"] = lr * mult
            opt.step()
        return step

    start = final_loss(sgd, 0.0)
    best_sgd = min(final_loss(sgd, lr) for lr in (0.1, 0.3, 1.0, 3.0))
    best_muon = min(final_loss(muon, lr) for lr in (0.03, 0.1, 0.3, 1.0))
    assert best_sgd < start  # SGD does learn
    assert best_muon < 0.5 * best_sgd, (start, best_sgd, best_muon)


# --- world-size invariance over gloo ----------------------------------------------

WORLD_CONFIGS = {"recipe": dict(muon_smoothing=0.2, snoo=True, snoo_every=3), "adamw": dict(optimizer="adamw"),
                 "recipe_compiled_style": dict(muon_smoothing=0.2, snoo=True, snoo_every=3)}
LAUNCHED_BY_STEP = {"recipe_compiled_style"}  # hooks off, as for a compiled model: step() launches
WORLD_STEPS, WORLD_PAUSE = 6, (2, 2)


def run_world_configs(rank, world_size):
    results = {}
    for name, overrides in WORLD_CONFIGS.items():
        cfg = make_cfg(**overrides)
        model = Toy()
        opt = optimizer_set(model, cfg, rank, world_size, launch_from_hooks=name not in LAUNCHED_BY_STEP)
        launched = []  # which groups' hooks started communication during backward, per step
        def record(step):
            launched.append([[slot.launched for slot in m.slots] if isinstance(m, tg.DistAdam)
                             else [g.launched for g in m.groups] for m in opt.members])
        train(model, opt, WORLD_STEPS, rank, world_size, pause_at=WORLD_PAUSE, cfg=cfg, before_step=record)
        results[name] = {"params": params_of(model), "state": copy.deepcopy(opt.state_dict()), "launched": launched}
    return results


def world_worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.save(run_world_configs(rank, world_size), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world_runs(tmp_path_factory):
    runs = {1: [run_world_configs(0, 1)]}
    for world_size in (2, 4):
        out = tmp_path_factory.mktemp(f"world{world_size}")
        mp.spawn(world_worker, args=(world_size, free_port(), str(out)), nprocs=world_size, join=True)
        runs[world_size] = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    return runs


def gathered(per_rank, rows):
    """The first `rows` rows of a state tensor held as whole copies or as row shards over ranks."""
    return (per_rank[0] if per_rank[0].size(0) >= rows else torch.cat(per_rank))[:rows]


# Relative to how far each weight moved. bf16 orthogonalisation turns rounding differences into
# a few % (reordering micro-batches on ONE process does the same); the AdamW path is fp32 math.
WORLD_TOLERANCE = {"recipe": 0.1, "adamw": 0.03, "recipe_compiled_style": 0.1}


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("config", list(WORLD_CONFIGS))
def test_same_training_for_any_world_size(world_runs, world_size, config):
    single = world_runs[1][0][config]
    ranks = [run[config] for run in world_runs[world_size]]
    start = params_of(Toy())
    for name, expected in single["params"].items():
        for other in ranks[1:]:  # the all-gathers leave every rank with the same weights
            assert torch.equal(other["params"][name], ranks[0]["params"][name]), name
        moved = (expected.float() - start[name].float()).norm()
        error = (ranks[0]["params"][name].float() - expected.float()).norm()
        assert moved > 0 and error <= WORLD_TOLERANCE[config] * moved + 1e-4, (name, error / moved)
    # Moments scale with the gradient, so they catch a sum-instead-of-average over ranks.
    for m, member in enumerate(single["state"]["members"]):
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            for i, expected in enumerate(member.get(key, [])):
                got = gathered([r["state"]["members"][m][key][i] for r in ranks], expected.size(0))
                error, scale = (got.float() - expected.float()).norm(), expected.float().norm()
                assert scale > 0 and error < 0.05 * scale, (key, i, error / scale)


@pytest.mark.slow
def test_hooks_launch_communication_during_the_last_backward(world_runs):
    """Adam groups only on their stepping (odd) steps and not while paused; Muon every step."""
    assert not any(any(any(flags) for flags in step) for step in world_runs[1][0]["recipe"]["launched"])
    paused = range(WORLD_PAUSE[0], WORLD_PAUSE[0] + WORLD_PAUSE[1])
    for world_size in (2, 4):
        for run in world_runs[world_size]:
            for step, (adam, scalar, muon) in enumerate(run["recipe"]["launched"]):
                assert all(adam) == (step % 2 == 1) and any(adam) == all(adam)
                assert scalar == [step % 2 == 1 and step not in paused]
                assert all(muon)
            for step, (everything,) in enumerate(run["adamw"]["launched"]):
                assert all(everything)
            # with the hooks off nothing starts during backward; step() launches it all (bucket order)
            assert not any(any(any(flags) for flags in step) for step in run["recipe_compiled_style"]["launched"])
