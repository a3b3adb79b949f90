"""What a run computes in (issue 19): float32 on a CPU by default, bfloat16 on CUDA, and a log
header that says which, with the CPU's capability and a warning where bf16 would crawl."""
import pytest
import torch

import train_gpt as tg
from conftest import optimizer_set


@pytest.mark.parametrize("preset", list(tg.PRESETS))
def test_every_preset_chooses_its_dtypes_by_device(preset):
    cfg = tg.build_config(preset)
    assert cfg.model.compute_dtype == "auto" and cfg.optim.orthogonalize_dtype == "auto"


def test_auto_is_float32_on_cpu_and_bfloat16_on_cuda():
    assert tg.resolve_dtype("auto", "cpu") == torch.float32
    assert tg.resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert tg.resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # still selectable on a CPU
    assert tg.resolve_dtype("float32", "cuda") == torch.float32


def test_cpu_model_holds_and_computes_float32_by_default():
    model = tg.GPT(tg.build_config("test").model)
    assert model.dtype == torch.float32
    assert {model.lm_head.dtype, model.smear_gate.dtype, model.blocks[0].attn.output_gate.dtype,
            model.value_embeds[0].dtype} == {torch.float32}
    tokens = torch.randint(0, 50000, (64,), generator=torch.Generator().manual_seed(0))
    hidden = model.hidden_states(tokens, torch.tensor([0, 64], dtype=torch.int32), 64, (128, 64))
    assert hidden.dtype == torch.float32
    bf16 = tg.GPT(tg.build_config("test", compute_dtype="bfloat16").model)
    assert bf16.dtype == bf16.lm_head.dtype == torch.bfloat16


def test_cpu_muon_orthogonalises_in_float32_unless_told_otherwise():
    matrix = torch.nn.Parameter(torch.randn(8, 8))
    matrix.label = "mlp_fc"
    model = torch.nn.Module()
    model.w = matrix
    muon = optimizer_set(model, tg.build_config("test"), 0, 1).members[0]
    assert muon.orthogonalize_dtype == torch.float32
    told = optimizer_set(model, tg.build_config("test", orthogonalize_dtype="bfloat16"), 0, 1).members[0]
    assert told.orthogonalize_dtype == torch.bfloat16
    # The float32 iteration is not the bf16 one rounded: the two differ visibly.
    G = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    fp32, bf16 = tg.polar_express(G, dtype=torch.float32), tg.polar_express(G, dtype=torch.bfloat16)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert (fp32 - bf16.float()).abs().max() > 1e-3


@pytest.mark.parametrize("native, args, warned", [
    (False, {}, False),
    (False, {"compute_dtype": "bfloat16"}, True),
    (False, {"orthogonalize_dtype": "bfloat16"}, True),
    (True, {"compute_dtype": "bfloat16"}, False),
])
def test_log_header_states_dtypes_and_warns_about_slow_bf16(monkeypatch, native, args, warned):
    monkeypatch.setattr(tg, "cpu_has_native_bf16", lambda: native)
    lines = tg.compute_lines(tg.build_config("test", **args), torch.device("cpu"))
    compute = "bfloat16" if args.get("compute_dtype") == "bfloat16" else "float32"
    assert lines[0].startswith(f"compute: {compute} (--compute-dtype {args.get('compute_dtype', 'auto')})")
    assert lines[1] == (f"cpu: capability {torch.backends.cpu.get_cpu_capability()}, "
                        f"native bf16 {'yes' if native else 'no'}")
    assert any(line.startswith("warning: bfloat16 on a CPU without native bf16") for line in lines) == warned


def test_a_real_log_carries_the_compute_lines(tmp_path):
    cfg = tg.config_from_args(["--preset", "test", "--log-dir", str(tmp_path), "--run-id", "dtype",
                               "--num-iterations", "3", "--extension-iterations", "0", "--val-every", "0"])
    tg.train(cfg, [])
    text = (tmp_path / "dtype.txt").read_text()
    assert "\ncompute: float32 (--compute-dtype auto), orthogonalisation float32 (--orthogonalize-dtype auto)\n" in text
    assert f"\ncpu: capability {torch.backends.cpu.get_cpu_capability()}, native bf16 " in text
