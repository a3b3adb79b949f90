"""The CPU-testable parts of `python -m tests.gpu_check`: stage selection, report format, no-CUDA exit."""
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO
import train_gpt as tg
from tests import gpu_check


def test_stage_selection_by_group_name_and_all():
    assert gpu_check.select_stages("all") == gpu_check.ALL_STAGES
    assert gpu_check.select_stages("speed") == ["short_compiled", "medium_steps", "medium_2025_12_31_steps",
                                                "short_2026_07_17_compiled"]
    # names come back in run order, without repeats
    assert gpu_check.select_stages("flex_vs_sdpa,fp8_head,correctness") == gpu_check.STAGE_GROUPS["correctness"]
    assert gpu_check.select_stages("medium_steps, varlen_vs_sdpa") == ["varlen_vs_sdpa", "medium_steps"]
    with pytest.raises(gpu_check.StageError, match="unknown stage 'warp'"):
        gpu_check.select_stages("fp8_head,warp")
    with pytest.raises(gpu_check.StageError, match="no stage"):
        gpu_check.select_stages(" , ")


def test_every_stage_has_a_function():
    assert set(gpu_check.STAGES) == set(gpu_check.ALL_STAGES)


def test_report_is_one_json_object_and_a_failing_stage_is_reported(monkeypatch):
    def broken():
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setitem(gpu_check.STAGES, "fp8_head", lambda: {"ok": True, "relative_error": 0.001})
    monkeypatch.setitem(gpu_check.STAGES, "flex_vs_sdpa", broken)
    results = gpu_check.run_stages(["fp8_head", "flex_vs_sdpa"])
    report = json.loads(json.dumps(gpu_check.build_report(results, gpu_check.environment_info(), 1.23)))
    assert report["report"] == "gpu_check" and report["ok"] is False and report["failed"] == ["flex_vs_sdpa"]
    assert report["stages"]["fp8_head"]["ok"] is True and "seconds" in report["stages"]["fp8_head"]
    assert report["stages"]["flex_vs_sdpa"]["error"] == "RuntimeError: kernel exploded"
    assert report["reference"]["short_ms_per_step"]["393216"] == 736.0 and "989" in report["reference"]["mfu_denominator"]
    assert report["environment"]["torch"] == torch.__version__
    assert gpu_check.build_report({}, {}, 0.0)["ok"] is False  # nothing ran: not ok


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_says_so_and_exits_nonzero():
    result = subprocess.run([sys.executable, "-m", "tests.gpu_check", "--stages", "fp8_head"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert "needs a CUDA GPU" in result.stderr


def test_unknown_stage_is_a_one_line_error():
    result = subprocess.run([sys.executable, "-m", "tests.gpu_check", "--stages", "nope"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: unknown stage 'nope'")


def test_fp8_stage_logic_on_cpu():
    result = gpu_check.stage_fp8_head(T=64, dim=32, vocab=256, device="cpu")
    assert result["ok"], result


@pytest.mark.slow
def test_timed_run_logic_on_cpu():
    """The speed stage's loop on the `test` preset, compiled with aot_eager on CPU: every stage timed,
    no recompiles after the warm-up."""
    cfg = gpu_check.speed_config("test", "--compile-backend", "aot_eager", "--warmup-steps", "4")
    result = gpu_check.timed_run(cfg, steps_per_stage=2, device=torch.device("cpu"))
    assert list(result["stages"]) == ["stage0", "stage1", "stage2", "extension"]
    assert [s["batch_tokens"] for s in result["stages"].values()] == [512, 1024, 1024, 1024]
    assert all(s["ms_per_step"] > 0 and s["steps"] == 2 for s in result["stages"].values())
    assert result["graphs_compiled_in_warmup"] >= 4 and result["recompiles_after_warmup"] == 0
    json.dumps(result)


@pytest.mark.slow
def test_untie_and_multi_token_phases_compile_once_on_cpu():
    """The medium_2025_12_31 stage's shrunk schedule on its cpu-size variant, compiled with aot_eager: the three
    multi-token phases and the untied embedding are all compiled in the warm-up, none after."""
    small = ["--num-layers", "2", "--model-dim", "32", "--head-dim", "16", "--gate-dims", "8", "--window-pattern", "LS",
             "--value-embed-pattern", "0.", "--skip-connections", "1<0", "--backout-layer", "0"]
    cfg = gpu_check.speed_config("medium_2025_12_31_cpu", "--compile-backend", "aot_eager", "--num-iterations", "12",
                                 "--extension-iterations", "2", "--warmup-steps", "4",
                                 "--batch-tokens-stages", ",".join(["512"] * 12), "--batch-tokens-extension", "512",
                                 "--long-window-blocks-stages", ",".join(["4"] * 12), "--val-tokens", "4096",
                                 "--val-every", "0", *small)
    result = gpu_check.timed_run(cfg, steps_per_stage=14, device=torch.device("cpu"))
    assert result["graphs_compiled_in_warmup"] >= 4 and result["recompiles_after_warmup"] == 0, result
    assert math.isfinite(result["final_validation"]["val_loss"])


def test_attention_stage_logic_on_cpu():
    """The comparison loop itself (SDPA in bf16 against SDPA in fp32 here; varlen/flex on CUDA), both window kinds."""
    assert gpu_check.schedule_windows("short") == [128, 384, 640, 768, 896, 1408, 1664, 2560]
    for block in (0, 32):
        result = gpu_check.attention_vs_sdpa("sdpa", [0, 64, 96], block=block, T=256, heads=2, dim=16, device="cpu")
        assert result["ok"] and list(result["windows"]) == ["0", "64", "96"], result
        assert all(w["out"] < 1e-2 for w in result["windows"].values())


@pytest.mark.slow
def test_short_2026_07_17_stage_compiles_once_on_cpu(monkeypatch):
    """Record #89's preset at CPU size through the speed stage's loop, compiled with aot_eager, the FP8 MLP on
    (the CPU's _scaled_mm) with its in-forward scale update: paired heads, MUDD, the multi-token phases and the
    untie all compile in the warm-up, none after."""
    monkeypatch.setattr(tg, "fp8_supported", lambda x: x.size(0) % 16 == 0)
    cfg = gpu_check.speed_config("short_2026_07_17_cpu", "--compile-backend", "aot_eager", "--num-iterations", "12",
                                 "--extension-iterations", "2", "--warmup-steps", "6", "--val-tokens", "4096",
                                 "--val-every", "0", "--model-dim", "64", "--head-dim", "32", "--bigram-dim", "16",
                                 "--fp8-mlp", "true")
    result = gpu_check.timed_run(cfg, steps_per_stage=4, device=torch.device("cpu"))
    assert result["graphs_compiled_in_warmup"] >= 4 and result["recompiles_after_warmup"] == 0, result
    assert math.isfinite(result["final_validation"]["val_loss"])
