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
