"""End-to-end training runs of the `test` preset on the shipped sample (CPU, gloo)."""
import os
import re
import subprocess
import sys

import pytest

import train_gpt as tg
from conftest import REPO, free_port
from records import logs

SCRIPT = os.path.join(REPO, "train_gpt.py")


def parse_log(path):
    """(text, {step: val_loss}, {step: train_loss}) through the records package's log parser."""
    run = logs.parse_log(str(path))
    text = open(path, encoding="utf-8", errors="replace").read()
    val = {v.step: v.val_loss for v in run.val_steps}
    train = {s.step: s.train_loss for s in run.train_steps if s.train_loss is not None}
    return text, val, train


def run(cmd, tmp_path, run_id, extra=(), timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = ["--preset", "test", "--log-dir", str(tmp_path), "--run-id", run_id, *extra]
    result = subprocess.run([*cmd, SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return parse_log(tmp_path / f"{run_id}.txt")


def torchrun(nproc, *extra):
    return [sys.executable, "-m", "torch.distributed.run", *extra, f"--nproc_per_node={nproc}"]


@pytest.fixture(scope="module")
def single_and_pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    one = run([sys.executable], tmp, "one")
    two = run(torchrun(2, "--standalone"), tmp, "two")
    return tmp, one, two


@pytest.mark.slow
def test_two_gloo_ranks_train_and_val_loss_falls(single_and_pair):
    _, _, (text, val, train) = single_and_pair
    steps = sorted(val)
    assert steps[0] == 0 and steps[-1] == 14
    assert val[14] < val[0] - 1.0
    assert "world_size: 2" in text and re.search(r"^final: val_loss:[\d.]+ train_time_ms:\d+ steps:14$", text, re.M)


@pytest.mark.slow
def test_one_and_two_ranks_give_the_same_losses(single_and_pair):
    _, (_, val1, train1), (_, val2, train2) = single_and_pair
    assert sorted(train1) == sorted(train2) == list(range(1, 15))
    for step in train1:
        assert train1[step] == pytest.approx(train2[step], abs=2e-2), step
    for step in val1:
        assert val1[step] == pytest.approx(val2[step], abs=2e-2), step


@pytest.mark.slow
def test_log_starts_with_exact_script_bytes(single_and_pair):
    tmp, _, _ = single_and_pair
    raw = open(tmp / "one.txt", "rb").read()
    source = open(SCRIPT, "rb").read()
    assert raw.startswith(source)
    marker = raw[len(source):].split(b"\n", 1)[0].decode()
    import hashlib
    assert marker == tg.END_OF_SCRIPT.format(digest=hashlib.sha256(source).hexdigest(), size=len(source))
    header = raw[len(source):].decode()
    for key in ("run_id: one", "argv: ", "world_size: 1", "python: ", "torch: ", "triton: ", "device: cpu",
                "nvidia-smi: ", "config: {"):
        assert key in header


@pytest.mark.slow
def test_multi_node_as_two_local_agents(single_and_pair, tmp_path):
    _, (_, val1, _), _ = single_and_pair
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    agents = []
    for node in range(2):
        cmd = [*torchrun(1, "--nnodes=2", f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}"),
               SCRIPT, "--preset", "test", "--log-dir", str(tmp_path), "--run-id", "multi"]
        agents.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [a.communicate(timeout=240)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), outputs[0][-2000:] + outputs[1][-2000:]
    text, val, _ = parse_log(tmp_path / "multi.txt")
    assert "world_size: 2" in text and "--nnodes=2" in text
    assert val[14] == pytest.approx(val1[14], abs=2e-2)


def in_process_config(tmp_path, run_id, *extra):
    return tg.config_from_args(["--preset", "test", "--log-dir", str(tmp_path), "--run-id", run_id,
                                "--checkpoint-dir", str(tmp_path / "ckpt"), *extra])


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_trajectory(tmp_path):
    full = in_process_config(tmp_path, "full", "--checkpoint-every", "6")
    tg.train(full, [])
    _, val_full, train_full = parse_log(tmp_path / "full.txt")
    checkpoint = tmp_path / "ckpt" / "full" / "step_000006"
    assert (checkpoint / "rank0.pt").is_file() and not list(checkpoint.glob("*.tmp"))
    resumed = in_process_config(tmp_path, "resumed", "--resume", str(checkpoint))
    tg.train(resumed, [])
    text, val_res, train_res = parse_log(tmp_path / "resumed.txt")
    assert f"resumed from {checkpoint} at step 6" in text
    assert sorted(train_res) == list(range(7, 15))
    for step in train_res:
        assert train_res[step] == train_full[step], step
    assert val_res[14] == val_full[14]


def test_nan_loss_stops_the_run_and_keeps_the_log(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = tg.GPT.forward

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] > 8 else loss

    monkeypatch.setattr(tg.GPT, "forward", poisoned)
    cfg = in_process_config(tmp_path, "nan", "--val-every", "0")
    with pytest.raises(tg.TrainingDiverged, match=r"training loss is nan at step \d+"):
        tg.train(cfg, [])
    text = (tmp_path / "nan.txt").read_text()
    assert "error: TrainingDiverged: training loss is nan" in text.splitlines()[-1]


@pytest.mark.parametrize("extra, message", [
    (["--train-files", "nowhere/*.bin"], "error: no train files match 'nowhere/*.bin'"),
    (["--batch-slices", "3"], "error: batch of 512 tokens is not divisible into --batch-slices 3"),
    (["--preset", "galaxy"], "error: unknown preset 'galaxy'"),
    (["--window-pattern", "SL"], "error: --window-pattern 'SL': needs one character per layer"),
    (["--orthogonalizer", "qr"], "error: --orthogonalizer 'qr': choose one of"),
])
def test_bad_input_fails_before_training_with_one_line(tmp_path, extra, message):
    result = subprocess.run([sys.executable, SCRIPT, "--preset", "test", "--log-dir", str(tmp_path), *extra],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert not list(tmp_path.glob("*.txt"))  # no log: nothing was trained


def test_existing_log_is_never_overwritten(tmp_path):
    (tmp_path / "taken.txt").write_text("precious")
    with pytest.raises(tg.ConfigError, match="already exists"):
        tg.train(in_process_config(tmp_path, "taken"), [])
    assert (tmp_path / "taken.txt").read_text() == "precious"


def test_logged_throughput_counts_every_step_at_its_own_batch_size(tmp_path, monkeypatch):
    """tokens/s is the tokens trained so far over the training time so far (the batch grows by stage)."""
    monkeypatch.setattr(tg, "peak_flops", lambda device: 1e12)  # a known peak makes a CPU run log MFU
    cfg = in_process_config(tmp_path, "rate", "--log-every", "1")
    tg.train(cfg, [])
    schedule = tg.Schedule.of(cfg)
    pattern = re.compile(r"step:(\d+)/\d+ train_time:(\d+)ms .* tokens/s:(\d+) mfu:([\d.]+)%")
    rates = {int(m[1]): (int(m[2]), int(m[3]), float(m[4]))
             for m in pattern.finditer(open(tmp_path / "rate.txt").read())}
    assert sorted(rates) == list(range(1, schedule.total_steps + 1))
    for done, (ms, rate, mfu) in rates.items():
        tokens = sum(schedule.at(step).batch_tokens for step in range(done))
        if ms >= 20:  # train_time is logged in whole ms
            assert rate == pytest.approx(tokens / (ms / 1000), rel=0.05), done
        assert mfu > 0
