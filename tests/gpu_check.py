"""One command that checks a CUDA machine: `python -m tests.gpu_check [--stages ...] [--out FILE]`.

Runs the GPU correctness checks and speed measurements of the trainer and prints ONE JSON
report on stdout (progress goes to stderr). Time on one H200 (2026-12-04, cold Inductor cache):
the correctness group 90 s; short_compiled over 230 s (its warm-up compiles 17 graphs: 72 s with
a warm cache); the two medium stages were not timed yet. Run the stages in separate calls, each
under its own `timeout`, when a device session is short.
Without CUDA it says so and exits with status 2. Not collected by pytest (no test_ prefix);
its CPU-testable parts (stage selection, report format, the no-CUDA exit) are tested in
tests/test_gpu_check.py.

Stages (run in this order; `--stages` takes names or the groups `correctness`, `speed`, `all`):
  correctness: varlen_vs_sdpa, fp8_head, triton_kernels, flex_vs_sdpa
  speed:       short_compiled (also checks: zero recompiles after the warm-up), medium_steps,
               medium_2025_12_31_steps (the untie and multi-token phases compiled; zero recompiles after warm-up),
               short_2026_07_17_compiled (record #89's preset: paired heads, MUDD, FP8 MLP; every stage, the
               untie; zero recompiles after warm-up)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

import train_gpt as tg  # noqa: E402

STAGE_GROUPS = {
    "correctness": ["varlen_vs_sdpa", "fp8_head", "triton_kernels", "flex_vs_sdpa"],
    "speed": ["short_compiled", "medium_steps", "medium_2025_12_31_steps", "short_2026_07_17_compiled"],
}
ALL_STAGES = [name for group in STAGE_GROUPS.values() for name in group]

# The 2025-12-21 record code (varlen attention) measured on this workplace's 1xH100 80GB, torch 2.11, synthetic tokens.
REFERENCE = {
    "source": "2025-12-21 record code with varlen_attn, 1xH100 80GB, torch 2.11 + CUDA 13 (measured here before)",
    "short_ms_per_step": {"131072": 259.0, "262144": 480.5, "393216": 736.0},
    "short_peak_memory_gib": 31.4,
    "short_mfu_percent": 41.0,
    "mfu_denominator": "dense bf16 peak, 989 TFLOP/s per H100 (no sparsity)",
    "attention_ms_fwd_bwd": {"T16384_window384": {"varlen": 1.23, "flex": 1.28},
                             "T16384_window1408": {"varlen": 1.06, "flex": 0.86},
                             "T49152_window384": {"varlen": 2.18, "flex": 1.47},
                             "T49152_window1408": {"varlen": 2.74, "flex": 1.96}},
}


class StageError(ValueError):
    pass


def select_stages(spec: str) -> list[str]:
    """'all', a group name, or comma-separated stage names -> stage names in run order."""
    wanted = set()
    for item in filter(None, (x.strip() for x in spec.split(","))):
        if item == "all":
            wanted.update(ALL_STAGES)
        elif item in STAGE_GROUPS:
            wanted.update(STAGE_GROUPS[item])
        elif item in ALL_STAGES:
            wanted.add(item)
        else:
            raise StageError(f"unknown stage {item!r}; choose all, {', '.join(STAGE_GROUPS)} or one of: "
                             + ", ".join(ALL_STAGES))
    if not wanted:
        raise StageError("no stage selected")
    return [name for name in ALL_STAGES if name in wanted]


def build_report(results: dict, environment: dict, wall_s: float) -> dict:
    """The single JSON object printed at the end. ok: every stage ran and passed its checks."""
    return {
        "report": "gpu_check",
        "ok": bool(results) and all(r.get("ok", False) for r in results.values()),
        "environment": environment,
        "stages": results,
        "failed": [name for name, r in results.items() if not r.get("ok", False)],
        "wall_s": round(wall_s, 1),
        "reference": REFERENCE,
    }


def environment_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "triton": getattr(tg.triton, "__version__", None) if tg.triton is not None else None,
            "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count())
    return info


def progress(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


# --- correctness ------------------------------------------------------------------------------


def packed_segments(T: int, seed: int, device) -> tg.Segments:
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < T:
        n = min(int(torch.randint(50, 2000, (1,), generator=g)), T - total)
        lengths.append(n)
        total += n
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return tg.make_segments(cu, max(lengths), T)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def schedule_windows(preset: str) -> list[int]:
    """Every window (long and short, in tokens) a preset's schedule uses, its final validation included."""
    cfg = tg.config_from_args(["--preset", preset])
    schedule = tg.Schedule.of(cfg)
    return sorted({w for step in range(schedule.total_steps) for w in schedule.windows(step)}
                  | set(schedule.final_val_windows()))


def attention_vs_sdpa(backend: str, windows: list[int], block: int = 0, T: int = 8192, heads: int = 6,
                      dim: int = 128, device: str = "cuda") -> dict:
    """Forward and the three gradients of `backend` vs the SDPA path (fp32 reference), per window."""
    segments = packed_segments(T, 0, device)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(T, heads, dim, device=device, generator=g, dtype=torch.bfloat16) for _ in range(3))
    grad_out = torch.randn(T, heads, dim, device=device, generator=g, dtype=torch.bfloat16)
    attend = tg.ATTENTION_BACKENDS[backend]
    per_window, ok = {}, True
    for window in windows:
        outs = []
        for fn, dtype in ((attend, torch.bfloat16), (tg.attention_sdpa, torch.float32)):
            leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
            out = fn(*leaves, segments, window, dim ** -0.5, block)
            grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
            outs.append([out, *grads])
        errors = {name: relative_error(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), *outs)}
        window_ok = all(e < 2e-2 for e in errors.values())  # bf16 attention vs fp32: ~4e-3 expected
        ok &= window_ok
        per_window[str(window)] = {"ok": window_ok, **{k: round(e, 6) for k, e in errors.items()}}
    return {"ok": ok, "tokens": T, "block": block, "windows": per_window, "tolerance_relative": 2e-2}


def stage_varlen_vs_sdpa() -> dict:
    return attention_vs_sdpa("varlen", schedule_windows("short"))


def stage_flex_vs_sdpa() -> dict:
    """Token windows of the short schedule, and 128-token block windows (a sample of the medium schedule's)."""
    token = attention_vs_sdpa("flex", schedule_windows("short"))
    block_windows = schedule_windows("medium")
    block = attention_vs_sdpa("flex", block_windows[::max(1, len(block_windows) // 6)], block=128, heads=8)
    return {"ok": token["ok"] and block["ok"], "token_windows": token, "block_windows": block}


def stage_fp8_head(T: int = 8192, dim: int = 768, vocab: int = 50304, device: str = "cuda") -> dict:
    """FP8 head (forward and both gradients) vs a bf16 matmul and vs a quantise-dequantise reference."""
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(T, dim, device=device, generator=g).bfloat16()
    x = tg.rms_norm(x)
    w = (torch.randn(vocab, dim, device=device, generator=g) * 0.005).bfloat16()
    grad = (torch.randn(T, vocab, device=device, generator=g) * 1e-4).bfloat16()
    xs, ws, gs = tg.ModelConfig().fp8_scales
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = tg.fp8_linear(xl, wl, xs, ws, gs)[0]
    out.backward(grad)
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = xb @ wb.T
    ref.backward(grad)

    def qdq(t, scale, dtype):
        return tg.to_fp8(t, scale, dtype).float() * scale

    g8 = qdq(grad, gs, torch.float8_e5m2)
    qdq_ref = {"out": qdq(x, xs, torch.float8_e4m3fn) @ qdq(w, ws, torch.float8_e4m3fn).T,
               "grad_x": g8 @ qdq(w, ws, torch.float8_e4m3fn), "grad_w": g8.T @ qdq(x, xs, torch.float8_e4m3fn)}
    ours = {"out": out, "grad_x": xl.grad, "grad_w": wl.grad}
    bf16 = {"out": ref, "grad_x": xb.grad, "grad_w": wb.grad}
    vs_qdq = {k: round(relative_error(ours[k], qdq_ref[k]), 6) for k in ours}
    vs_bf16 = {k: round(relative_error(ours[k], bf16[k]), 6) for k in ours}
    ok = all(e < 1e-2 for e in vs_qdq.values()) and all(e < 0.15 for e in vs_bf16.values())
    return {"ok": ok, "relative_error_vs_quantised_reference": vs_qdq, "relative_error_vs_bf16": vs_bf16,
            "tolerances": {"quantised_reference": 1e-2, "bf16": 0.15}, "tokens": T}


def stage_triton_kernels() -> dict:
    """Both symmetric Triton kernels vs torch, at the short model's Muon shapes."""
    if tg.triton is None:
        return {"ok": False, "error": "triton is not importable"}
    g = torch.Generator(device="cuda").manual_seed(2)
    results, ok = {}, True
    for shape in ((4, 768, 768), (11, 768, 3072), (2, 1024, 4096)):
        X = torch.randn(*shape, device="cuda", generator=g).bfloat16() / math.sqrt(shape[-1])
        gram_err = relative_error(tg.triton_gram(X), X.float() @ X.float().mT)
        A = (X @ X.mT)
        poly_err = relative_error(tg.triton_gram_polynomial(A, -4.7, 2.1),
                                  -4.7 * A.float() + 2.1 * (A.float() @ A.float()))
        shape_ok = gram_err < 1e-2 and poly_err < 1e-2
        ok &= shape_ok
        results["x".join(map(str, shape))] = {"ok": shape_ok, "gram": round(gram_err, 6),
                                              "gram_polynomial": round(poly_err, 6)}
    return {"ok": ok, "shapes": results, "tolerance_relative": 1e-2}


# --- speed ------------------------------------------------------------------------------------


def timed_run(cfg: tg.Config, steps_per_stage: int, device=torch.device("cuda", 0)) -> dict:
    """Compile, warm up every shape, then time `steps_per_stage` steps of every batch/window stage.
    (Runs on CPU too, without memory figures, which is how the tests check its logic.)"""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def reset_peak():
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def peak_gib():
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None

    torch.manual_seed(cfg.run.seed)
    raw_model = tg.GPT(cfg.model, device)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    model = torch.compile(raw_model, dynamic=False, backend=cfg.run.compile_backend)
    optimizers = tg.OptimizerSet(raw_model, cfg.optim, 0, 1, schedule_steps=cfg.schedule.num_iterations)
    schedule = tg.Schedule.of(cfg)
    loader = tg.make_train_loader(cfg, 0, 1, device)
    val_batches = tg.make_val_batches(cfg, 0, 1, device)
    t, graphs_at_start = time.perf_counter(), tg.compiled_graph_count()
    progress("  compiling every shape (warm-up) ...")
    tg.warm_up(model, raw_model, optimizers, loader, schedule, cfg, val_batches)
    sync()
    warmup_s = time.perf_counter() - t
    progress(f"  warm-up: {warmup_s:.0f}s, {tg.compiled_graph_count() - graphs_at_start} graphs")
    graphs_before = tg.compiled_graph_count()
    peak = tg.peak_flops(device)
    stages, step, total = {}, 0, schedule.total_steps
    while step < total:
        stage = schedule.stage_index(step)
        reset_peak()
        sync()
        t, first = time.perf_counter(), step
        while step < total and schedule.stage_index(step) == stage and step - first < steps_per_stage:
            plan = schedule.at(step)
            tg.apply_transitions(plan, raw_model, optimizers, cfg.schedule.scalar_pause_steps)
            tg.train_step(model, optimizers, loader.next_step(plan.batch_tokens, plan.max_seq_len), plan,
                          plan.max_seq_len, cfg.loop.train_loss_reduction)
            step += 1
        sync()
        ms = 1000 * (time.perf_counter() - t) / (step - first)
        tokens_per_s = plan.batch_tokens / (ms / 1000)
        long_window = plan.windows[0]
        name = f"stage{stage}" if stage < len(cfg.schedule.batch_tokens_stages) else "extension"
        flops = tg.matmul_flops_per_token(raw_model, cfg.data.max_seq_len, long_window)
        stages[name] = {"batch_tokens": plan.batch_tokens, "long_window": long_window, "steps": step - first,
                        "ms_per_step": round(ms, 2), "tokens_per_s": round(tokens_per_s),
                        "mfu_percent": round(100 * tokens_per_s * flops / peak, 1) if peak else None,
                        "peak_memory_gib": peak_gib()}
        progress(f"  {name}: {ms:.1f} ms/step at {plan.batch_tokens} tokens")
        while step < total and schedule.stage_index(step) == stage:  # skip the rest of the stage
            plan = schedule.at(step)
            tg.apply_transitions(plan, raw_model, optimizers, cfg.schedule.scalar_pause_steps)
            step += 1
    reset_peak()
    t = time.perf_counter()
    val_loss = tg.evaluate(model, val_batches, schedule.final_val_windows(), 1, tg.train_micro_batch_tokens(cfg))
    val = {"val_loss": round(val_loss, 4), "seconds": round(time.perf_counter() - t, 2),
           "peak_memory_gib": peak_gib(),
           "tokens": cfg.data.val_tokens}
    return {"warmup_s": round(warmup_s, 1), "graphs_compiled_in_warmup": graphs_before - graphs_at_start,
            "recompiles_after_warmup": tg.compiled_graph_count() - graphs_before, "stages": stages,
            "final_validation": val, "peak_flops_denominator": peak,
            "mfu_denominator": "dense bf16 peak of the device (train_gpt.PEAK_BF16_TFLOPS)"}


def speed_config(preset: str, *extra: str) -> tg.Config:
    return tg.config_from_args(["--preset", preset, "--data", "synthetic", "--run-id", "gpu_check", *extra])


def stage_short_compiled() -> dict:
    """The short preset compiled, on synthetic tokens: each batch stage, the extension and the final
    validation, ms/step after warm-up; zero recompiles after the warm-up is the correctness check."""
    # 8 steps per stage (the schedule shrunk to 24 + 4 steps keeps every batch size and window).
    cfg = speed_config("short", "--num-iterations", "24", "--extension-iterations", "4", "--warmup-steps", "8",
                       "--val-tokens", str(2 * 1024 * 1024), "--val-every", "12")
    result = timed_run(cfg, steps_per_stage=8)
    result["ok"] = result["recompiles_after_warmup"] == 0 and math.isfinite(result["final_validation"]["val_loss"])
    return result


def stage_medium_steps() -> dict:
    """A few medium-preset steps at one window: ms/step and peak memory."""
    cfg = speed_config("medium", "--num-iterations", "4", "--warmup-steps", "1", "--window-schedule", "stages",
                       "--long-window-blocks-stages", "13", "--val-tokens", str(2 * 1024 * 1024))
    result = timed_run(cfg, steps_per_stage=4)
    result["ok"] = math.isfinite(result["final_validation"]["val_loss"])
    return result


def stage_medium_2025_12_31_steps() -> dict:
    """The medium_2025_12_31 preset at its final batch and window, shrunk to 12 + 2 steps so that its
    multi-token phases (3, 2, 1 targets) and the untied embedding (from step 4) each compile once."""
    def twelve(value) -> str:  # the record's 12 stages, all at the final size: the MTP weights fade by stage
        return ",".join([str(value)] * 12)

    cfg = speed_config("medium_2025_12_31", "--num-iterations", "12", "--extension-iterations", "2",
                       "--warmup-steps", "4", "--batch-tokens-stages", twelve(524288),
                       "--long-window-blocks-stages", twelve(23), "--val-tokens", str(2 * 1024 * 1024),
                       "--val-every", "0")
    result = timed_run(cfg, steps_per_stage=14)
    result["ok"] = result["recompiles_after_warmup"] == 0 and math.isfinite(result["final_validation"]["val_loss"])
    return result


def stage_short_2026_07_17_compiled() -> dict:
    """The short_2026_07_17 preset compiled on synthetic tokens, shrunk to 24 + 2 steps (8 a batch stage, the
    untie after step 17): ms/step per stage, and zero recompiles after the warm-up."""
    cfg = speed_config("short_2026_07_17", "--num-iterations", "24", "--extension-iterations", "2",
                       "--warmup-steps", "8", "--val-tokens", str(2 * 1024 * 1024), "--val-every", "0")
    result = timed_run(cfg, steps_per_stage=8)
    result["ok"] = result["recompiles_after_warmup"] == 0 and math.isfinite(result["final_validation"]["val_loss"])
    return result


STAGES = {name: globals()[f"stage_{name}"] for name in ALL_STAGES}


def run_stages(names: list[str]) -> dict:
    results = {}
    for name in names:
        progress(f"{name} ...")
        t = time.perf_counter()
        try:
            result = STAGES[name]()
        except Exception as e:  # one failing stage must not hide the others
            result = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0],
                      "traceback": traceback.format_exc()[-2000:]}
        result["seconds"] = round(time.perf_counter() - t, 1)
        results[name] = result
        progress(f"{name}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']}s")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="all", help="all | correctness | speed | comma-separated stage names")
    parser.add_argument("--out", default="", help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    try:
        names = select_stages(args.stages)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: tests.gpu_check needs a CUDA GPU and none is available here; "
              "run the CPU test suite with `python -m pytest tests` instead", file=sys.stderr)
        return 2
    t = time.perf_counter()
    report = build_report(run_stages(names), environment_info(), time.perf_counter() - t)
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
