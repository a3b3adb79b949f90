"""The GPU training path checked on CPU: validation chunks, constant shapes for torch.compile,
shared attention masks, flex, the FP8 head regions, host syncs, collective launch order."""
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import REPO, optimizer_set

BOS = 50256
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_config(*extra):
    return tg.config_from_args(["--preset", "test", *extra])


def write_val_shard(tmp_path, n_tokens=6000, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, BOS, size=n_tokens).astype(np.uint16)
    tokens[rng.choice(n_tokens, size=n_tokens // 300, replace=False)] = BOS  # documents of ~300 tokens
    tokens[0] = BOS
    tg.write_shard(str(tmp_path / "v_val_000000.bin"), tokens)
    return tokens, str(tmp_path / "v_val_*.bin")


# --- validation: fixed chunks per forward, independent of the world size -----------------------


@pytest.mark.parametrize("world_size", [2, 4])
def test_validation_chunks_do_not_depend_on_world_size(tmp_path, world_size):
    _, pattern = write_val_shard(tmp_path)
    cfg = make_config("--val-files", pattern, "--val-tokens", "4096", "--val-batch-tokens", "2048",
                      "--batch-slices", "4")
    one = tg.make_val_batches(cfg, 0, 1, "cpu")
    many = [tg.make_val_batches(cfg, r, world_size, "cpu") for r in range(world_size)]
    assert [mb.inputs.numel() for mb in one] == [512] * 8  # val_batch_tokens / batch_slices per forward
    for i, mb in enumerate(one):  # chunk i belongs to rank i % W at W ranks
        other = many[i % world_size][i // world_size]
        assert torch.equal(mb.inputs, other.inputs) and torch.equal(mb.cu_seqlens, other.cu_seqlens)


def test_validation_cuts_documents_only_at_chunk_ends(tmp_path):
    tokens, pattern = write_val_shard(tmp_path, seed=1)
    chunks = list(tg.validation_batches(pattern, 0, 1, val_tokens=4096, chunk_tokens=1024, bos_id=BOS))
    assert torch.cat([mb.inputs for mb in chunks]).tolist() == tokens[:4096].tolist()
    for mb in chunks:
        starts = [0] + [i for i in range(1, 1024) if mb.inputs[i] == BOS] + [1024]
        assert mb.cu_seqlens.tolist() == starts


def test_loss_in_pieces_equals_the_whole():
    torch.manual_seed(0)
    model = tg.GPT(make_config("--compute-dtype", "float32", "--head-init-std", "0.05").model)
    tokens = torch.randint(0, 50000, (96,))
    cu = torch.tensor([0, 40, 96], dtype=torch.int32)
    whole = model(tokens, tokens.roll(-1), cu, 96, (128, 0))
    pieces = model(tokens, tokens.roll(-1), cu, 96, (128, 0), loss_piece=32)
    uneven = model(tokens, tokens.roll(-1), cu, 96, (128, 0), loss_piece=40)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(uneven, whole, rtol=1e-5, atol=1e-4)


# --- rotary: angles relative to each sequence start ------------------------------------------


def test_rotary_angles_are_relative_to_the_sequence_start():
    """A sequence far into a packed batch is rotated exactly as if it stood alone."""
    rotary = tg.Rotary(16, 1 / 1024)
    start, n = 300_000, 12
    cu = torch.tensor([0, start, start + n], dtype=torch.int32)
    segments = tg.make_segments(cu, start, start + n)
    assert segments.position[start:].tolist() == list(range(n)) and segments.position[start - 1] == start - 1
    x = torch.randn(n, 1, 16, generator=torch.Generator().manual_seed(0))
    packed = torch.cat([torch.zeros(start, 1, 16), x])
    alone = tg.make_segments(torch.tensor([0, n], dtype=torch.int32), n, n)
    assert torch.equal(tg.rotate(packed, rotary(segments.position))[start:], tg.rotate(x, rotary(alone.position)))


# --- attention masks: one predicate, one mask per window and forward ------------------------


def test_one_mask_per_window_is_built_and_shared_by_the_layers(monkeypatch):
    built = []
    original = tg.ATTENTION_MASKS["sdpa"]
    monkeypatch.setitem(tg.ATTENTION_MASKS, "sdpa",
                        lambda seg, window, block: built.append(window) or original(seg, window, block))
    cfg = make_config("--window-block", "32")
    model = tg.GPT(cfg.model)  # window pattern SLNL: three attention layers, two windows
    tokens = torch.randint(0, 50000, (64,))
    model(tokens, tokens, torch.tensor([0, 30, 64], dtype=torch.int32), 64, (128, 64))
    assert sorted(built) == [64, 128]


def test_varlen_window_comes_from_the_mask_predicate():
    """The mask predicate and varlen's window_size agree on how many earlier keys a query sees."""
    for window in (1, 5, 384):
        back = tg.keys_before(window)
        assert bool(tg.attention_mask_allows(back, 0, 0, 0, window))
        assert not bool(tg.attention_mask_allows(back + 1, 0, 0, 0, window))


def qkv(T, heads=2, dim=16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, heads, dim, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def test_flex_with_a_prebuilt_block_mask_matches_sdpa():
    T = 256
    q, k, v = qkv(T, seed=1)
    segments = tg.make_segments(torch.tensor([0, 70, 71, 200, 256], dtype=torch.int32), 129, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is slow
        for window in (1, 64, 300):
            mask = tg.flex_block_mask(segments, window)
            torch.testing.assert_close(tg.attention_flex(q, k, v, segments, window, 0.3, mask=mask),
                                       tg.attention_sdpa(q, k, v, segments, window, 0.3), rtol=1e-4, atol=1e-4)


def test_flex_training_on_cpu_is_refused_with_a_true_message(tmp_path):
    q, k, v = qkv(32, requires_grad=True)
    segments = tg.make_segments(torch.tensor([0, 32], dtype=torch.int32), 32, 32)
    with pytest.raises(RuntimeError, match="no CPU backward"):
        tg.attention_flex(q, k, v, segments, 8, 0.3)
    # ... and torch itself refuses too, compiled as well as eager (what the message claims).
    from torch.nn.attention.flex_attention import flex_attention
    args = [t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v)]
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex_attention(*args)
    with pytest.raises(Exception, match="backward on CPU"):
        torch.compile(flex_attention, backend="aot_eager")(*args)
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_gpt.py"), "--preset", "test", "--device", "cpu",
                             "--attention-backend", "flex", "--log-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "flex cannot train on CPU" in result.stderr.strip().splitlines()[-1]


@needs_cuda
def test_flex_forward_and_backward_match_sdpa_on_cuda():
    T = 1024
    q, k, v = [t.cuda().requires_grad_() for t in qkv(T, seed=2)]
    segments = tg.make_segments(torch.tensor([0, 300, 301, 900, T], dtype=torch.int32, device="cuda"), 599, T)
    for window in (128, 384):
        grads = []
        for attend in (tg.attention_flex, tg.attention_sdpa):
            out = attend(q, k, v, segments, window, 0.3)
            grads.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


# --- FP8 head: one region per direction, fast accumulation forward -------------------------


def test_fp8_forward_uses_fast_accumulation_and_backward_does_not(monkeypatch):
    calls = []
    original = torch._scaled_mm

    def recording(*args, **kwargs):
        calls.append(kwargs.get("use_fast_accum", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    x = torch.randn(32, 64).bfloat16().requires_grad_()
    w = (torch.randn(48, 64) * 0.005).bfloat16().requires_grad_()
    out = tg.fp8_linear(x, w, 100 / 448, 1.5 / 448, 0.75 / 448)[0]
    assert calls == [True]
    out.backward(torch.randn(32, 48).bfloat16() * 0.01)
    assert calls == [True, False, False]


@pytest.mark.slow
def test_fp8_backward_region_compiles_to_the_eager_result_on_cpu():
    """The compiled region (Inductor on CPU here, as it is on CUDA in training) computes the same as eager."""
    g = torch.Generator().manual_seed(3)
    grad = (torch.randn(64, 96, generator=g) * 0.01).bfloat16()
    x8 = tg.to_fp8(torch.randn(64, 32, generator=g), 100 / 448, torch.float8_e4m3fn)
    w8 = tg.to_fp8(torch.randn(96, 32, generator=g) * 0.005, 1.5 / 448, torch.float8_e4m3fn)
    scales = (100 / 448, 1.5 / 448, 0.75 / 448)
    eager = tg.fp8_backward_math(grad, x8, w8, *scales)
    compiled = torch.compile(tg.fp8_backward_math, dynamic=False)(grad, x8, w8, *scales)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)


# --- host syncs and collective launch order ------------------------------------------------------


def test_train_loss_is_read_only_when_logged(tmp_path, monkeypatch):
    reads = {"n": 0}
    original = torch.Tensor.item

    def counting(self):
        reads["n"] += 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "item", counting)
    cfg = make_config("--log-dir", str(tmp_path), "--run-id", "sync", "--num-iterations", "6",
                      "--extension-iterations", "0", "--val-every", "0", "--train-loss-every", "3")
    tg.train(cfg, [])
    assert reads["n"] == 3  # the losses of steps 3 and 6, and the final validation
    text = (tmp_path / "sync.txt").read_text()
    logged = [int(m[1]) for m in re.finditer(r"^step:(\d+)/6 train_time.* train_loss:", text, re.M)]
    assert logged == [3, 6] and len(re.findall(r"^step:\d+/6 train_time", text, re.M)) == 6


def test_every_reduction_is_launched_before_any_group_updates(monkeypatch):
    cfg = make_config()
    model = tg.GPT(cfg.model)
    optimizers = optimizer_set(model, cfg)
    tokens = torch.randint(0, 50000, (64,))
    model(tokens, tokens, torch.tensor([0, 64], dtype=torch.int32), 64, (128, 0)).backward()
    step = 1  # Adam steps every 2nd step: both kinds of group update now
    seen = []

    def launched(member):
        return all(unit.launched for unit in member.units)

    for member in optimizers.members:
        original = member.step
        monkeypatch.setattr(member, "step", lambda *a, _o=original: seen.append(
            [launched(m) for m in optimizers.members]) or _o(*a))
    optimizers.step(step, 1.0, 0.9)
    assert len(seen) == len(optimizers.members) >= 2 and all(all(flags) for flags in seen[:1])


# --- compiled model: no recompiles after the warm-up ------------------------------------------------


def test_compiled_graph_count_sees_a_recompile():
    f = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    before = tg.compiled_graph_count()
    f(torch.ones(3))
    f(torch.ones(5))
    assert tg.compiled_graph_count() - before == 2


@pytest.mark.slow
def test_compiled_test_preset_never_recompiles_after_warm_up(tmp_path):
    """Every batch/window stage, the extension, every validation and the final validation run on graphs
    the warm-up built."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_gpt.py"), "--preset", "test",
                             "--compile-cpu", "true", "--compile-backend", "aot_eager", "--warmup-steps", "6",
                             "--log-dir", str(tmp_path), "--run-id", "compiled"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "compiled.txt").read_text()
    before, after = map(int, re.search(r"^compile: (\d+) graphs compiled before the timed loop, (\d+) after$",
                                       text, re.M).groups())
    assert before >= 4 and after == 0  # train graphs per stage + validation graphs per window
    assert re.search(r"^step:14/14 val_loss:", text, re.M)


@pytest.mark.slow
def test_flex_model_compiled_by_inductor_on_cpu_matches_sdpa():
    """The compiled path of flex (block mask built inside the graph, Inductor's CPU flex kernel), forward."""
    torch.manual_seed(0)
    cfg = make_config("--compute-dtype", "float32", "--head-init-std", "0.05")
    model = tg.GPT(cfg.model)
    tokens = torch.randint(0, 50000, (256,))
    cu = torch.tensor([0, 90, 91, 200, 256], dtype=torch.int32)
    with torch.no_grad():
        expected = model.logits(tokens, cu, 256, (128, 0))
        model.attention_backend = "flex"
        compiled = torch.compile(model.logits, dynamic=False, backend="inductor")
        torch.testing.assert_close(compiled(tokens, cu, 256, (128, 0)), expected, rtol=1e-3, atol=1e-3)
