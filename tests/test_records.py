"""Tests of the records package: log parsing, statistics against scipy, record folders,
diff, compare, plot and reproduce. Synthetic logs are built with a tiny fake script."""

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy import stats as sps

from conftest import REPO
from records import cli, stats
from records.logs import LogError, parse_log, parse_log_bytes

FAKE_SCRIPT = b"print('tiny fake trainer')\n"
MARKER = "==== end of script: sha256={} bytes={} ====\n"


def log_text(script=FAKE_SCRIPT, run_id="run0", seed=0, target=3.28, val=(4.0, 3.5, 3.27),
             times=(0.0, 500.0, 1000.0), steps=20, final=True, error=None, device="cuda: 8x NVIDIA H100 80GB HBM3",
             command=None, world_size=8, extra_header=""):
    """The bytes of a log as train_gpt.py writes them."""
    argv = ["--seed", str(seed)]
    command = command or f"torchrun --standalone --nproc_per_node={world_size} train_gpt.py --seed {seed}"
    config = {"preset": "short", "seed": seed, "run_id": run_id, "target_val_loss": target}
    lines = [
        f"run_id: {run_id}", f"command: {command}", f"argv: {json.dumps(argv)}", f"world_size: {world_size}",
        "python: 3.11.7", "torch: 2.13.0", "triton: 3.6.0", f"device: {device}",
        "nvidia-smi: ", "  | NVIDIA-SMI 580.00 |", "  | 0  H100  |",
    ]
    lines += [line for line in extra_header.splitlines()]
    lines.append(f"config: {json.dumps(config)}")
    lines.append("warmup: 10 untimed steps in 12.3s, state restored")
    every = steps // (len(val) - 1)
    for i, (loss, t) in enumerate(zip(val, times)):
        step = i * every
        if step > 0:
            lines.append(f"step:{step}/{steps} train_time:{t:.0f}ms step_avg:{t / step:.2f}ms "
                         f"train_loss:{loss + 0.1:.4f} eta:1s tokens/s:123456 mfu:41.0%")
        lines.append(f"step:{step}/{steps} val_loss:{loss:.4f} train_time:{t:.0f}ms step_avg:{t / max(step, 1):.2f}ms")
    if final:
        lines.append("peak memory: allocated 31000 MiB, reserved 32000 MiB")
        lines.append(f"final: val_loss:{val[-1]:.4f} train_time_ms:{times[-1]:.0f} steps:{steps}")
    if error:
        lines.append(f"error: {error}")
    head = script + (b"" if script.endswith(b"\n") else b"\n")
    marker = MARKER.format(hashlib.sha256(script).hexdigest(), len(script)).encode()
    return head + marker + ("\n".join(lines) + "\n").encode()


def write_log(directory, run_id, **kw):
    path = os.path.join(str(directory), f"{run_id}.txt")
    with open(path, "wb") as f:
        f.write(log_text(run_id=run_id, **kw))
    return path


def write_runs(directory, losses, times_ms, script=FAKE_SCRIPT, prefix="r", **kw):
    return [write_log(directory, f"{prefix}{i}", seed=i, script=script, val=(4.0, 3.5, loss),
                      times=(0.0, t / 2, t), **kw)
            for i, (loss, t) in enumerate(zip(losses, times_ms))]


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- log parsing ----------------------------------------------------------------

def test_parse_complete_log(tmp_path):
    path = write_log(tmp_path, "abc", seed=3, val=(4.0, 3.5, 3.2793), times=(0.0, 61000.0, 122100.0), steps=2000)
    log = parse_log(path)
    assert log.script == FAKE_SCRIPT
    assert log.script_sha256 == hashlib.sha256(FAKE_SCRIPT).hexdigest()
    assert log.run_id == "abc" and log.seed == 3 and log.target == 3.28
    assert log.world_size == 8 and log.device == "cuda: 8x NVIDIA H100 80GB HBM3"
    assert log.argv == ["--seed", "3"]
    assert log.command.startswith("torchrun --standalone --nproc_per_node=8 train_gpt.py")
    assert "NVIDIA-SMI 580.00" in log.header["nvidia-smi"]  # indented continuation lines
    assert log.config["preset"] == "short"
    assert [v.step for v in log.val_steps] == [0, 1000, 2000]
    assert log.val_steps[-1].val_loss == 3.2793 and log.val_steps[-1].train_time_ms == 122100
    assert [s.step for s in log.train_steps] == [1000, 2000]
    assert log.train_steps[0].train_loss == pytest.approx(3.6) and log.train_steps[0].extra["mfu"] == "41.0%"
    assert log.finished and log.final_val_loss == 3.2793 and log.final_train_time_ms == 122100
    assert log.final_steps == 2000
    assert any(n.startswith("peak memory:") for n in log.notes)
    assert log.missing() == [] and log.unparsed == [] and log.error is None


def test_script_without_trailing_newline_and_marker_template_in_script():
    # The real script contains the marker's unformatted template; it must not be mistaken for the marker.
    script = b'END = "==== end of script: sha256={digest} bytes={size} ===="\nx = 1'
    log = parse_log_bytes(log_text(script=script), "x.txt")
    assert log.script == script and log.finished


def test_parse_partial_log_reports_what_is_missing(tmp_path):
    data = log_text(final=False, error="RuntimeError: CUDA out of memory")
    log = parse_log_bytes(data, "crashed.txt")
    assert not log.finished and log.final_val_loss is None and log.final_train_time_ms is None
    assert log.error == "RuntimeError: CUDA out of memory"
    assert any(m.startswith("no final line: the run did not finish") and "out of memory" in m for m in log.missing())
    with pytest.raises(LogError, match="crashed.txt: no final line"):
        log.require_finished()

    # Cut in the middle of the header (the config line is incomplete) and mid-line.
    cut = data[:data.index(b"config:") + 30]
    log = parse_log_bytes(cut, "cut.txt")
    assert log.config is None and "run_id" in log.header
    missing = log.missing()
    assert "config line is not valid JSON (truncated?)" in missing
    assert "no training step lines" in missing and "no validation lines" in missing
    assert "no final line: the run did not finish" in missing

    # Only the script and marker: every header field is reported missing.
    only_script = data[:data.index(b"run_id:")]
    missing = parse_log_bytes(only_script, "s.txt").missing()
    assert "no 'command:' header line" in missing and "no 'config:' header line" in missing


def test_truncated_step_line_is_kept_as_unparsed():
    data = log_text(final=False)
    log = parse_log_bytes(data + b"step:21/20 train_ti", "t.txt")
    assert log.unparsed == ["step:21/20 train_ti"]
    assert any("unreadable" in m for m in log.missing())


def test_check_command_describes_complete_partial_and_malformed_logs(tmp_path, capsys):
    done = write_log(tmp_path, "done", val=(4.0, 3.5, 3.2793), times=(0.0, 61000.0, 122100.0), steps=2000)
    code, out, _ = run_cli(capsys, "check", done)
    assert code == 0 and out == f"{done}: speedrun log, finished: val_loss 3.2793, 122.10 s, 2000 steps\n"
    crashed = write_log(tmp_path, "crashed", final=False, error="RuntimeError: boom")
    code, out, _ = run_cli(capsys, "check", done, crashed)
    assert code == 1
    assert out.splitlines()[1] == (f"{crashed}: speedrun log, partial: last step 20/20, last val_loss 3.2700 at step 20; "
                                   "missing: no final line: the run did not finish (RuntimeError: boom)")
    junk = tmp_path / "junk.txt"
    junk.write_text("hello\n")
    code, out, err = run_cli(capsys, "check", junk, done)
    assert code == 2 and "junk.txt: not a training log" in err and "finished" in out


def test_malformed_logs_name_the_file(tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("just some text\nstep:1/2 val_loss:3.0\n")
    with pytest.raises(LogError, match=r"notes.txt: not a training log: no valid '==== end of script"):
        parse_log(str(plain))
    edited = tmp_path / "edited.txt"
    edited.write_bytes(log_text().replace(b"tiny fake", b"tiny FAKE"))
    with pytest.raises(LogError, match="edited.txt: embedded script does not match the sha256"):
        parse_log(str(edited))
    with pytest.raises(LogError, match="absent.txt: cannot read"):
        parse_log(str(tmp_path / "absent.txt"))


# --- statistics vs scipy ----------------------------------------------------------

LOSSES = [3.2781, 3.2795, 3.2770, 3.2802, 3.2788, 3.2779, 3.2791]


def test_one_sample_stats_match_scipy():
    x = np.array(LOSSES)
    s = stats.record_stats(LOSSES, 3.28)
    expected_p = sps.ttest_1samp(x, 3.28, alternative="less").pvalue
    expected_ci = sps.t.interval(0.99, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert s["n"] == 7
    assert s["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert s["std"] == pytest.approx(x.std(ddof=1), rel=1e-12)
    assert s["p_value"] == pytest.approx(expected_p, rel=1e-9)
    assert s["ci99"] == pytest.approx(list(expected_ci), rel=1e-12)
    # Agreement to the printed precision.
    text = stats.format_record_stats(s)
    assert f"p = {expected_p:.4g}" in text
    assert f"99% CI ({expected_ci[0]:.6f}, {expected_ci[1]:.6f})" in text
    assert f"std {x.std(ddof=1):.6f}" in text


def test_medium_record_published_interval():
    # The medium record (2025-09-30) publishes: 160 runs, mean 2.919547, std 0.000798 -> 99% t-interval
    # (2.919383, 2.919712).
    half = sps.t.ppf(0.995, 159) * 0.000798 / math.sqrt(160)
    rng = np.random.default_rng(0)
    z = rng.standard_normal(160)
    x = 2.919547 + 0.000798 * (z - z.mean()) / z.std(ddof=1)
    s = stats.summarize(x)
    # The published figures are rounded, so the upper bound sits on a rounding edge.
    assert s.ci == pytest.approx((2.919383, 2.919712), abs=1.5e-6)
    assert s.ci[1] - s.ci[0] == pytest.approx(2 * half)


def test_p_value_for_other_targets_and_degenerate_inputs():
    for target in (3.27, 3.2787, 3.29):
        assert stats.one_sample_p_less(LOSSES, target) == pytest.approx(
            sps.ttest_1samp(LOSSES, target, alternative="less").pvalue, rel=1e-9)
    assert stats.one_sample_p_less([3.0], 3.28) is None
    assert stats.one_sample_p_less([3.0, 3.0], 3.28) == 0.0  # no spread, below target
    assert stats.summarize([3.0]).std is None


@pytest.mark.filterwarnings("ignore:Precision loss occurred")  # scipy, on resamples of identical values
def test_bootstrap_fraction_is_seeded_and_matches_scipy():
    x = np.array(LOSSES)
    frac = stats.bootstrap_fraction_below(x, 3.28, resamples=500, sample_size=5, seed=42)
    rng = np.random.default_rng(42)
    samples = x[rng.integers(0, len(x), size=(500, 5))]
    p = sps.ttest_1samp(samples, 3.28, axis=1, alternative="less").pvalue
    assert frac == np.mean(p < 0.01)
    assert frac == stats.bootstrap_fraction_below(x, 3.28, resamples=500, sample_size=5, seed=42)
    assert 0 < frac < 1  # the case is not trivial


def test_stats_cli_json_and_text(capsys):
    times = [122100, 121800, 122500, 122000, 121900, 122300, 122200]
    args = ["stats", "--values", *LOSSES, "--target", 3.28, "--times", *times, "--iterations", 2000,
            "--bootstrap", 300, "--sample-size", 4, "--seed", 7]
    code, out, _ = run_cli(capsys, *args, "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result) == {"n", "mean", "std", "ci99", "p_value", "target", "meets_rule", "problems", "time_mean",
                           "time_std", "time_ci99", "ms_per_iter", "boot_frac_below_001",
                           # every input that shaped the numbers
                           "losses", "times_ms", "iterations", "boot_resamples", "boot_sample_size", "boot_seed"}
    assert result["losses"] == LOSSES and result["times_ms"] == times and result["iterations"] == 2000
    assert (result["boot_resamples"], result["boot_sample_size"], result["boot_seed"]) == (300, 4, 7)
    assert result["meets_rule"] is True and result["problems"] == []
    minutes = np.array(times) / 60_000
    assert result["time_mean"] == pytest.approx(minutes.mean())
    assert result["time_std"] == pytest.approx(minutes.std(ddof=1))
    assert result["time_ci99"] == pytest.approx(list(sps.t.interval(0.99, 6, loc=minutes.mean(),
                                                                     scale=sps.sem(minutes))))
    assert result["ms_per_iter"] == pytest.approx(np.mean(times) / 2000)
    assert result["boot_frac_below_001"] == stats.bootstrap_fraction_below(LOSSES, 3.28, 300, 4, 7)
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and "p = " in out and "ms/iter over 2000 timed iterations" in out and "bootstrap:" in out
    code, out, _ = run_cli(capsys, "stats", "--values", *LOSSES, "--target", 3.28, "--json")
    assert set(json.loads(out)) == {"n", "mean", "std", "ci99", "p_value", "target", "meets_rule", "problems",
                                    "losses"}


def test_stats_from_logs_and_folder(tmp_path, capsys):
    times = [122100, 121800, 122500]
    logs = write_runs(tmp_path, LOSSES[:3], times, steps=2000)
    code, out, _ = run_cli(capsys, "stats", *logs, "--json")
    result = json.loads(out)
    assert code == 0 and result["n"] == 3 and result["target"] == 3.28  # target from the config
    assert result["p_value"] == pytest.approx(sps.ttest_1samp(LOSSES[:3], 3.28, alternative="less").pvalue)
    assert result["ms_per_iter"] == pytest.approx(np.mean(times) / 2000)  # iterations from the final lines
    code, out, _ = run_cli(capsys, "stats", str(tmp_path), "--target", 3.279, "--json")
    assert json.loads(out)["target"] == 3.279


def test_stats_errors_are_one_line(tmp_path, capsys):
    crashed = write_log(tmp_path, "crashed", final=False, error="KeyboardInterrupt: ")
    for argv in (["stats", crashed], ["stats", "--values", 3.1], ["stats"], ["stats", tmp_path / "nothing.txt"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert "crashed.txt: no final line" in run_cli(capsys, "stats", crashed)[2]


# --- new / index ------------------------------------------------------------------

def test_new_creates_record_and_index(tmp_path, capsys):
    logs = write_runs(tmp_path, LOSSES[:3], [122100, 121800, 122500], steps=2000)
    records = tmp_path / "records"
    code, out, err = run_cli(capsys, "new", "--allow-not-significant", "--track", "short", "--name", "FasterThing", "--date", "2026-01-02",
                             "--records-dir", records, *logs)
    assert code == 0, err
    folder = records / "short" / "2026-01-02_FasterThing"
    assert sorted(os.listdir(folder)) == ["README.md", "r0.txt", "r1.txt", "r2.txt", "train_gpt.py"]
    assert (folder / "train_gpt.py").read_bytes() == FAKE_SCRIPT
    assert (folder / "r1.txt").read_bytes() == open(logs[1], "rb").read()
    readme = (folder / "README.md").read_text()
    assert "## What changed and why" in readme
    assert "torchrun --standalone --nproc_per_node=8 train_gpt.py --seed 1" in readme
    assert "cuda: 8x NVIDIA H100 80GB HBM3" in readme
    assert "| r2 | 2 | 2000 | 3.2770 | 122.50 | 61.25 |" in readme
    assert "Target val_loss: 3.28" in readme
    p = sps.ttest_1samp(LOSSES[:3], 3.28, alternative="less").pvalue
    assert f"p = {p:.4g}" in readme
    index = (records / "README.md").read_text()
    row = next(line for line in index.splitlines() if "FasterThing" in line)
    assert row.startswith("| 2026-01-02 | short | [FasterThing](short/2026-01-02_FasterThing/) | 122.13 s | ")
    assert f"| 3 | {p:.4g} | cuda: 8x NVIDIA H100 80GB HBM3 |" in row
    # Regenerating the index keeps the text around the table and does not duplicate rows.
    (records / "README.md").write_text("# intro\n\n" + index + "\nfooter\n")
    run_cli(capsys, "index", "--records-dir", records)
    text = (records / "README.md").read_text()
    assert text.startswith("# intro") and text.rstrip().endswith("footer") and text.count("| [FasterThing]") == 1


def test_new_readme_states_the_compute_dtype_and_cpu(tmp_path, capsys):
    header = ("compute: float32 (--compute-dtype auto), orthogonalisation float32 (--orthogonalize-dtype auto)\n"
              "cpu: capability AVX2, native bf16 no")
    logs = write_runs(tmp_path, LOSSES[:2], [1000, 1001], device="cpu: AMD EPYC (2 cores), 1 process(es)",
                      extra_header=header)
    code, _, err = run_cli(capsys, "new", "--allow-not-significant", "--track", "cpu", "--name", "Dtype",
                           "--records-dir", tmp_path / "records", *logs)
    assert code == 0, err
    readme = next((tmp_path / "records" / "cpu").iterdir()) / "README.md"
    text = readme.read_text()
    assert "- compute: float32 (--compute-dtype auto), orthogonalisation float32" in text
    assert "- cpu: capability AVX2, native bf16 no" in text


def test_new_target_option_is_kept_by_stats(tmp_path, capsys):
    logs = write_runs(tmp_path, LOSSES[:3], [1000, 1000, 1001])
    records = tmp_path / "records"
    run_cli(capsys, "new", "--allow-not-significant", "--track", "t", "--name", "N", "--date", "2026-01-01", "--target", 3.2785,
            "--records-dir", records, *logs)
    code, out, _ = run_cli(capsys, "stats", records / "t" / "2026-01-01_N", "--json")
    assert json.loads(out)["target"] == 3.2785


def test_new_refuses_overwrite(tmp_path, capsys):
    logs = write_runs(tmp_path, LOSSES[:2], [1000, 1100])
    records = tmp_path / "records"
    argv = ["new", "--allow-not-significant", "--track", "short", "--name", "X", "--date", "2026-01-02", "--records-dir", records, *logs]
    assert run_cli(capsys, *argv)[0] == 0
    folder = records / "short" / "2026-01-02_X"
    (folder / "README.md").write_text("edited by hand")
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    assert (folder / "README.md").read_text() == "edited by hand"
    assert sorted(os.listdir(records / "short")) == ["2026-01-02_X"]  # no temporary folder left behind


def test_new_refuses_mismatched_scripts(tmp_path, capsys):
    a = write_runs(tmp_path, LOSSES[:1], [1000], prefix="a")
    b = write_runs(tmp_path, LOSSES[1:2], [1000], prefix="b", script=b"print('other')\n")
    records = tmp_path / "records"
    code, out, err = run_cli(capsys, "new", "--allow-not-significant", "--track", "short", "--name", "X", "--records-dir", records, *a, *b)
    assert code == 2 and err.count("\n") == 1
    assert "b0.txt: its script" in err and "differs" in err
    assert not records.exists()


def test_new_refuses_unfinished_runs_and_bad_names(tmp_path, capsys):
    good = write_runs(tmp_path, LOSSES[:1], [1000])
    crashed = write_log(tmp_path, "crashed", final=False)
    records = tmp_path / "records"
    code, _, err = run_cli(capsys, "new", "--allow-not-significant", "--track", "short", "--name", "X", "--records-dir", records, *good, crashed)
    assert code == 2 and "crashed.txt: no final line" in err
    code, _, err = run_cli(capsys, "new", "--allow-not-significant", "--track", "short", "--name", "a/b", "--records-dir", records, *good)
    assert code == 2 and "--name" in err
    assert not records.exists()


# --- diff -------------------------------------------------------------------------

def test_diff_between_folder_log_and_py(tmp_path, capsys):
    log_a = write_log(tmp_path, "a", script=b"x = 1\ny = 2\nz = 3\n")
    log_b = write_log(tmp_path, "b", script=b"x = 1\ny = 20\nz = 3\n")
    records = tmp_path / "records"
    run_cli(capsys, "new", "--allow-not-significant", "--track", "t", "--name", "A", "--date", "2026-01-01", "--records-dir", records, log_a)
    folder_a = records / "t" / "2026-01-01_A"
    code, out, _ = run_cli(capsys, "diff", folder_a, log_b)
    assert code == 1
    assert out.splitlines() == [f"--- {folder_a}", f"+++ {log_b}", "@@ -1,3 +1,3 @@", " x = 1", "-y = 2", "+y = 20",
                                " z = 3"]
    py = tmp_path / "same.py"
    py.write_bytes(b"x = 1\ny = 2\nz = 3\n")
    code, out, err = run_cli(capsys, "diff", py, log_a)
    assert code == 0 and out == "" and "identical" in err
    # A folder without train_gpt.py (a folder of logs) stands for its logs' script; an empty one is an error.
    (tmp_path / "only_logs").mkdir()
    os.replace(log_b, tmp_path / "only_logs" / "b.txt")
    code, out, _ = run_cli(capsys, "diff", folder_a, tmp_path / "only_logs")
    assert code == 1 and "+y = 20" in out
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "diff", tmp_path / "empty", log_a)
    assert code == 2 and "no train_gpt.py and no .txt logs" in err


# --- compare ----------------------------------------------------------------------

def test_compare_matches_welch(tmp_path, capsys):
    a_times, b_times = [122100, 121800, 122500, 122000], [120100, 120900, 119800]
    a_loss, b_loss = LOSSES[:4], LOSSES[4:7]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a_logs = write_runs(tmp_path / "a", a_loss, a_times)
    b_logs = write_runs(tmp_path / "b", b_loss, b_times)
    code, out, _ = run_cli(capsys, "compare", "--a", *a_logs, "--b", *b_logs, "--json")
    c = json.loads(out)
    assert c["p_time"] == pytest.approx(sps.ttest_ind(a_times, b_times, equal_var=False).pvalue, rel=1e-9)
    assert c["p_loss"] == pytest.approx(sps.ttest_ind(a_loss, b_loss, equal_var=False).pvalue, rel=1e-9)
    assert c["a"]["n"] == 4 and c["b"]["n"] == 3
    assert c["time_delta_s"] == pytest.approx((np.mean(b_times) - np.mean(a_times)) / 1000)
    assert c["loss_delta"] == pytest.approx(np.mean(b_loss) - np.mean(a_loss))
    assert c["b"]["time_std_s"] == pytest.approx(np.std(b_times, ddof=1) / 1000)
    assert c["a"]["times_ms"] == a_times and c["b"]["losses"] == b_loss and c["a"]["logs"] == a_logs
    code, text, _ = run_cli(capsys, "compare", tmp_path / "a", tmp_path / "b")
    expected_p = sps.ttest_ind(a_times, b_times, equal_var=False).pvalue
    assert code == 0 and f"Welch p = {expected_p:.4g}" in text
    assert f"{np.mean(a_times) / 1000:.3f}" in text and f"{np.mean(b_loss):.5f}" in text
    assert run_cli(capsys, "compare", tmp_path / "a")[0] == 2


def test_statistics_match_the_textbook_formulas():
    """stats.py calls scipy; these plain formulas pin what it must compute."""
    x, target = np.array(LOSSES), 3.28
    n, mean, sd = len(x), sum(LOSSES) / len(LOSSES), math.sqrt(sum((v - sum(LOSSES) / 7) ** 2 for v in LOSSES) / 6)
    t_stat = (mean - target) / (sd / math.sqrt(n))
    assert stats.one_sample_p_less(x, target) == pytest.approx(sps.t.cdf(t_stat, n - 1), rel=1e-12)
    half = sps.t.ppf(0.995, n - 1) * sd / math.sqrt(n)
    assert stats.summarize(x).ci == pytest.approx((mean - half, mean + half), rel=1e-12)
    a, b = [122100.0, 121800.0, 122500.0, 122000.0], [120100.0, 120900.0, 119800.0]
    va = sum((v - sum(a) / 4) ** 2 for v in a) / 3 / 4
    vb = sum((v - sum(b) / 3) ** 2 for v in b) / 2 / 3
    t_welch = (sum(a) / 4 - sum(b) / 3) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)  # Welch-Satterthwaite
    assert stats.welch_p(a, b) == pytest.approx(2 * sps.t.sf(abs(t_welch), df), rel=1e-9)
    # Zero spread: the limits of the formulas (p 0 below target, 1 above, nan at it).
    assert stats.one_sample_p_less([3.0, 3.0], target) == 0.0
    assert stats.one_sample_p_less([3.3, 3.3], target) == 1.0
    assert math.isnan(stats.one_sample_p_less([3.28, 3.28], 3.28))
    assert stats.summarize([3.0, 3.0]).ci == (3.0, 3.0)


def test_welch_matches_scipy_on_random_data():
    rng = np.random.default_rng(3)
    for _ in range(5):
        a, b = rng.normal(0, 1, rng.integers(2, 20)), rng.normal(0.3, 2, rng.integers(2, 20))
        assert stats.welch_p(a, b) == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
    assert stats.welch_p([1.0], [1.0, 2.0]) is None


# --- plot -------------------------------------------------------------------------

def test_plot_writes_png(tmp_path, capsys):
    import matplotlib  # noqa: F401  (in requirements.txt, so a missing one fails here rather than skipping)
    logs = write_runs(tmp_path, LOSSES[:2], [1000, 1100])
    partial = write_log(tmp_path, "partial", final=False)
    out_png = tmp_path / "plot.png"
    code, out, err = run_cli(capsys, "plot", *logs, partial, "-o", out_png)
    assert code == 0, err
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    log = write_log(tmp_path, "r")
    code, out, err = run_cli(capsys, "plot", log, "-o", tmp_path / "p.png")
    assert code == 2 and err == "error: plot needs matplotlib, which is not installed: pip install matplotlib\n"
    assert not (tmp_path / "p.png").exists()


# --- command line -----------------------------------------------------------------

def test_every_command_has_help(capsys):
    result = subprocess.run([sys.executable, "-m", "records", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "usage: python -m records" in result.stdout
    for command in ("check", "new", "stats", "diff", "compare", "plot", "reproduce", "index"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_launch_command_is_rebuilt_from_the_log(tmp_path):
    log = parse_log_bytes(log_text(seed=5), "x.txt")
    argv = cli.launch_argv(log, "records/t/x/train_gpt.py", "new", "/tmp/logs", ["--val-every", "10"],
                           nproc_per_node=1)
    assert argv[-9:] == ["records/t/x/train_gpt.py", "--seed", "5", "--val-every", "10",
                         "--run-id", "new", "--log-dir", "/tmp/logs"]
    assert "--standalone" in argv and "--nproc_per_node=1" in argv and "--nproc_per_node=8" not in argv
    assert cli.strip_options(["--run-id", "a", "--log_dir=b", "--seed", "1", "--run_id=c"], cli.OWN_OPTIONS) == \
        ["--seed", "1"]
    python_log = parse_log_bytes(log_text(command="python train_gpt.py --preset cpu --seed 3"), "y.txt")
    assert cli.launch_argv(python_log, "s.py", "i", "d", [])[:2] == [sys.executable, "s.py"]


# --- reproduce --------------------------------------------------------------------

# A stand-in for train_gpt.py with the same command line and log format. It fails unless
# it runs from the repository root, where the relative data path resolves.
FAKE_TRAINER = textwrap.dedent('''\
    import argparse, hashlib, json, os, sys
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-id", default="x")
    p.add_argument("--log-dir", default="logs")
    p.add_argument("--preset", default="short")
    a = p.parse_args()
    if not os.path.exists("data/sample/tinyshakespeare_val_000000.bin"):
        sys.exit("relative data path does not resolve from " + os.getcwd())
    source = open(os.path.abspath(__file__), "rb").read()
    os.makedirs(a.log_dir, exist_ok=True)
    loss, ms = 3.27 + 0.001 * (a.seed % 5), 1000 + 10 * a.seed
    with open(os.path.join(a.log_dir, a.run_id + ".txt"), "xb") as f:
        f.write(source)
        f.write(("==== end of script: sha256=%s bytes=%d ====\\n" % (hashlib.sha256(source).hexdigest(), len(source))).encode())
        args = sys.argv[1:]
        cfg = {"seed": a.seed, "run_id": a.run_id, "target_val_loss": 3.28}
        for line in ["run_id: " + a.run_id, "command: python train_gpt.py " + " ".join(args), "argv: " + json.dumps(args),
                     "world_size: 1", "device: cpu: fake (2 cores), 1 process(es)", "config: " + json.dumps(cfg),
                     "step:10/10 val_loss:%.4f train_time:%dms step_avg:1.00ms" % (loss, ms),
                     "final: val_loss:%.4f train_time_ms:%d steps:10" % (loss, ms)]:
            f.write((line + "\\n").encode())
''')


def test_reproduce_runs_the_record_script_from_the_repo_root(tmp_path, capsys):
    trainer = tmp_path / "src" / "train_gpt.py"
    trainer.parent.mkdir()
    trainer.write_text(FAKE_TRAINER)
    first_logs = tmp_path / "first"
    for seed in (1, 2):
        subprocess.run([sys.executable, str(trainer), "--preset", "cpu", "--seed", str(seed), "--run-id", f"s{seed}",
                        "--log-dir", str(first_logs)], cwd=REPO, check=True, timeout=60)
    records = tmp_path / "records"
    code, _, err = run_cli(capsys, "new", "--allow-not-significant", "--track", "cpu", "--name", "Fake", "--date", "2026-01-01",
                           "--records-dir", records, first_logs / "s1.txt", first_logs / "s2.txt")
    assert code == 0, err
    folder = records / "cpu" / "2026-01-01_Fake"
    new_logs = tmp_path / "new"
    code, out, err = run_cli(capsys, "reproduce", folder, "--logs-dir", new_logs, "--runs", 3)
    assert code == 0, err
    assert sorted(os.listdir(new_logs)) == ["repro0_s1.txt", "repro1_s2.txt", "repro2_s1.txt"]
    rerun = parse_log(str(new_logs / "repro1_s2.txt"))
    assert rerun.script == trainer.read_bytes()
    assert rerun.argv == ["--preset", "cpu", "--seed", "2", "--run-id", "repro1_s2", "--log-dir", str(new_logs)]
    assert "Welch p" in out and "record 2026-01-01_Fake" in out
    # A = seeds 1, 2 (1010, 1020 ms); B repeats seed 1 in its third run (1010, 1020, 1010 ms).
    assert out.splitlines()[-1].startswith("B - A: time -0.002 s (-0.16%)")
    # A second reproduction into the same folder would overwrite logs: refused before anything runs.
    code, _, err = run_cli(capsys, "reproduce", folder, "--logs-dir", new_logs)
    assert code == 2 and "already exists" in err
    # Extra arguments after `--` reach the script; a failing run is one clear line.
    code, _, err = run_cli(capsys, "reproduce", folder, "--logs-dir", tmp_path / "bad", "--", "--bogus", "1")
    assert code == 2 and "run 1 failed with exit code 2" in err


@pytest.mark.slow
def test_round_trip_with_real_training(tmp_path, capsys):
    """train_gpt.py --preset test -> new -> reproduce -> compare. Needs the model and optimiser code."""
    first_logs = tmp_path / "first"
    result = subprocess.run([sys.executable, "train_gpt.py", "--preset", "test", "--seed", "1",
                             "--log-dir", str(first_logs), "--run-id", "seed1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    log = parse_log(str(first_logs / "seed1.txt"))
    assert log.finished and log.missing() == [], log.missing()
    assert log.script == open(os.path.join(REPO, "train_gpt.py"), "rb").read()
    assert log.command == f"python train_gpt.py --preset test --seed 1 --log-dir {first_logs} --run-id seed1"
    records = tmp_path / "records"
    code, _, err = run_cli(capsys, "new", "--allow-not-significant", "--track", "test", "--name", "RoundTrip", "--date", "2026-01-01",
                           "--records-dir", records, first_logs / "seed1.txt")
    assert code == 0, err
    folder = records / "test" / "2026-01-01_RoundTrip"
    code, out, err = run_cli(capsys, "reproduce", folder, "--logs-dir", tmp_path / "again")
    assert code == 0, err
    rerun = parse_log(str(tmp_path / "again" / "repro0_seed1.txt"))
    assert rerun.finished and rerun.script == log.script and rerun.seed == 1
    code, out, _ = run_cli(capsys, "compare", folder, tmp_path / "again", "--json")
    c = json.loads(out)
    assert c["a"]["n"] == c["b"]["n"] == 1
    # Same seed, script and data on the same CPU: the rerun reaches the same loss.
    assert c["loss_delta"] == pytest.approx(0, abs=1e-3)


# --- modded-nanogpt (upstream) logs -------------------------------------------------

UPSTREAM_SCRIPT = b"import torch\nprint0('=' * 100)\nstep_line = 'step:{step}/{total}'\n"
NVIDIA_SMI = "\n".join(["+-----------------------------------------------------------------------------+",
                        "| NVIDIA-SMI 570.148.08             Driver Version: 570.148.08     CUDA Version: 12.8 |",
                        "|=========================================+========================+==========|"]
                       + [f"|   {i}  NVIDIA H100 80GB HBM3          On  |   00000000:{i:02d}:00.0 Off |    0 |"
                          for i in range(8)])


def upstream_log_text(script=UPSTREAM_SCRIPT, val=(10.8258, 4.1, 3.2781), time_ms=98765.0, total=1750,
                      early=False, finished=True, untimed=0):
    """A synthetic log in modded-nanogpt's format: the newer one (script, then a '=' line, as print() writes it),
    or with early=True the 2024 one (script framed by '=' lines, train_loss on step lines). untimed: steps
    left off the clock at the start (step_avg = train_time / (step - untimed)), as many upstream logs do."""
    sep = "=" * 100
    lines = ["Running Python 3.12.7 (main, Oct  1 2024) [GCC 11.4.0]",
             "Running PyTorch 2.9.0.dev20250713+cu126 compiled for CUDA 12.6", NVIDIA_SMI, sep]
    steps = [0, total // 2, total] if finished else [0, total // 2]
    for i, step in enumerate(steps):
        t = time_ms * step / total
        lines.append(f"step:{step}/{total} val_loss:{val[i]:.4f} train_time:{t:.0f}ms "
                     f"step_avg:{t / max(step - untimed, 1):.2f}ms")
        if step < total:
            train = f" train_loss:{val[i] - 0.1:.4f}" if early else ""
            lines.append(f"step:{step + 1}/{total}{train} train_time:{t + 50:.0f}ms step_avg:{(t + 50) / (step + 1):.2f}ms")
    if finished:
        lines.append("peak memory allocated: 31000 MiB reserved: 32000 MiB")
    body = ("\n".join(lines) + "\n").encode()
    if early:
        return (sep + "\n").encode() + script + (sep + "\n").encode() + body
    return script + b"\n" + (sep + "\n").encode() + body  # print0(code) adds a newline


def write_upstream_runs(directory, losses, times_ms, script=UPSTREAM_SCRIPT, **kw):
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i, (loss, t) in enumerate(zip(losses, times_ms)):
        path = os.path.join(str(directory), f"0000000{i}-1111-2222-3333-444444444444.txt")
        with open(path, "wb") as f:
            f.write(upstream_log_text(script=script, val=(10.8258, 4.1, loss), time_ms=t, **kw))
        paths.append(path)
    return paths


def test_upstream_logs_of_both_generations_are_read(tmp_path, capsys):
    log = parse_log_bytes(upstream_log_text(), "u.txt")
    assert log.format == "modded-nanogpt" and log.variant == ""
    assert log.script == UPSTREAM_SCRIPT  # the newline print() added is not part of the script
    assert log.finished and log.final_val_loss == 3.2781 and log.final_train_time_ms == 98765 and log.final_steps == 1750
    assert [v.step for v in log.val_steps] == [0, 875, 1750] and [s.step for s in log.train_steps] == [1, 876]
    assert log.device == "cuda: 8x NVIDIA H100 80GB HBM3" and log.gpus == 8
    assert log.header["torch"] == "2.9.0.dev20250713+cu126" and log.missing() == []
    assert log.launch_command == "torchrun --standalone --nproc_per_node=8 train_gpt.py"
    old = parse_log_bytes(upstream_log_text(early=True), "old.txt")
    assert old.script == UPSTREAM_SCRIPT and old.finished and old.final_val_loss == 3.2781
    assert old.variant == "script between two '=' lines, train_loss on step lines"
    assert old.train_steps[0].train_loss == pytest.approx(10.7258)
    # check says which format each file is in.
    path = tmp_path / "old.txt"
    path.write_bytes(upstream_log_text(early=True))
    code, out, _ = run_cli(capsys, "check", path)
    assert code == 0 and out == (f"{path}: modded-nanogpt log (script between two '=' lines, train_loss on step "
                                 "lines), finished: val_loss 3.2781, 98.77 s, 1750 steps\n")


def test_unfinished_and_unrecognised_upstream_files_say_why(tmp_path, capsys):
    partial = tmp_path / "partial.txt"
    partial.write_bytes(upstream_log_text(finished=False))
    code, out, _ = run_cli(capsys, "check", partial)
    assert code == 1 and "modded-nanogpt log, partial: last step 876/1750" in out
    assert "no validation at the last step: the run did not finish" in out
    code, out, err = run_cli(capsys, "stats", partial, "--target", 3.28)
    assert code == 2 and out == "" and err == f"error: {partial}: no validation at the last step (the run did not finish)\n"
    cases = {
        "notes.md": (b"Title\n=========================\nsome text\n", "a line of '=' characters like a modded-nanogpt "
                     "log, but no 'step:N/T ...' lines after it"),
        "llmc.txt": (b"s:0 tel:10.9830\ns:1 trl:10.9 \n", "llm.c-era modded-nanogpt log"),
        "plain.txt": (b"hello\nstep:1/2 val_loss:3.0\n", "no line of '=' characters followed by 'step:N/T' lines"),
        "unclosed.txt": (b"=" * 100 + b"\nimport torch\n", "no second '=' line closing the script"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        code, out, err = run_cli(capsys, "check", path)
        assert code == 2 and out == "" and err.count("\n") == 1 and reason in err and name in err, err


def test_stats_compare_diff_plot_on_folders_of_upstream_logs(tmp_path, capsys):
    losses, times = [3.2781, 3.2795, 3.2770, 3.2779, 3.2788], [98765, 98100, 99020, 98500, 98650]
    a = tmp_path / "A"
    write_upstream_runs(a, losses, times)
    code, out, err = run_cli(capsys, "stats", a, "--target", 3.28, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["n"] == 5 and s["mean"] == pytest.approx(np.mean(losses))
    assert s["p_value"] == pytest.approx(sps.ttest_1samp(losses, 3.28, alternative="less").pvalue, rel=1e-12)
    assert s["time_mean"] * 60_000 == pytest.approx(np.mean(times)) and s["iterations"] == 1750
    assert s["meets_rule"] and len(s["sources"]) == 5
    code, out, err = run_cli(capsys, "stats", a)
    assert code == 2 and err.count("\n") == 1 and "record no target val_loss; pass --target" in err
    # diff shows the script change between two records, from their logs alone.
    b = tmp_path / "B"
    write_upstream_runs(b, losses[:3], [90000, 90500, 91000], script=UPSTREAM_SCRIPT.replace(b"100", b"80"))
    code, out, _ = run_cli(capsys, "diff", a, b)
    assert code == 1 and "-print0('=' * 100)" in out and "+print0('=' * 80)" in out
    code, out, _ = run_cli(capsys, "compare", a, b, "--json")
    c = json.loads(out)
    assert c["p_time"] == pytest.approx(sps.ttest_ind(times, [90000, 90500, 91000], equal_var=False).pvalue)
    fig, plotted = cli.draw_curves([str(a), str(b)], zoom=0.5, target=3.28)
    assert plotted == 8
    assert fig.axes[0].get_ylim()[1] == pytest.approx(3.78) and fig.axes[0].get_ylim()[0] < min(losses)
    assert fig._suptitle.get_text() == "val loss: A vs B (target 3.28)"
    fig, _ = cli.draw_curves([str(a)], zoom=None)
    assert fig.axes[1].get_ylim()[1] > 10.8  # --full-range: step 0 is shown


def test_new_imports_upstream_logs(tmp_path, capsys):
    losses = [3.2781, 3.2795, 3.2770, 3.2779, 3.2788]
    logs = write_upstream_runs(tmp_path / "up", losses, [98765, 98100, 99020, 98500, 98650])
    records = tmp_path / "records"
    code, out, err = run_cli(capsys, "new", "--track", "short", "--name", "Imported", "--date", "2025-08-23",
                             "--target", 3.28, "--records-dir", records, *logs)
    assert code == 0, err
    folder = records / "short" / "2025-08-23_Imported"
    assert (folder / "train_gpt.py").read_bytes() == UPSTREAM_SCRIPT
    assert (folder / os.path.basename(logs[2])).read_bytes() == open(logs[2], "rb").read()
    readme = (folder / "README.md").read_text()
    assert "torchrun --standalone --nproc_per_node=8 train_gpt.py" in readme and "Imported from modded-nanogpt" in readme
    assert "verdict: meets the record rule" in readme and "cuda: 8x NVIDIA H100 80GB HBM3" in readme
    code, out, _ = run_cli(capsys, "stats", folder, "--json")
    assert json.loads(out)["target"] == 3.28  # kept in the README


def test_upstream_timed_steps_mixed_scripts_and_world_size(tmp_path, capsys):
    """Real modded-nanogpt logs leave their first 10 steps off the clock: ms/iter divides by the timed steps
    the log's own step_avg implies. A folder mixing two scripts is pooled by stats with a warning, and diff
    says which log stands for it."""
    a = tmp_path / "A"
    write_upstream_runs(a, [3.2781, 3.2790], [98765, 98100], untimed=10)
    code, out, err = run_cli(capsys, "stats", a, "--target", 3.28, "--json")
    s = json.loads(out)
    assert s["iterations"] == 1740 and s["ms_per_iter"] == pytest.approx(np.mean([98765, 98100]) / 1740)
    assert s["step_counts"] == [1740, 1740] and s["distinct_scripts"] == 1
    mixed = tmp_path / "M"
    write_upstream_runs(mixed, [3.2781], [98765], untimed=10)
    other = upstream_log_text(script=UPSTREAM_SCRIPT.replace(b"100", b"80"), time_ms=99000, total=1760, untimed=10)
    (mixed / "99999999-1111-2222-3333-444444444444.txt").write_bytes(other)
    code, out, _ = run_cli(capsys, "stats", mixed, "--target", 3.28)
    assert code == 0 and "warning: these 2 logs embed 2 different scripts" in out
    assert "ms/iter: n/a (the runs time different step counts: [1740, 1750])" in out
    code, out, err = run_cli(capsys, "diff", mixed, a)
    assert code == 0 and f"note: {mixed}: its 2 logs embed 2 different scripts; this is the first log's, 00000000-" in err
    code, _, err = run_cli(capsys, "new", "--track", "short", "--name", "Up", "--target", 3.28, "--allow-not-significant",
                           "--records-dir", tmp_path / "recs", *sorted(str(p) for p in a.iterdir()))
    readme = next((tmp_path / "recs" / "short").iterdir()) / "README.md"
    text = readme.read_text()
    assert code == 0 and "- world size: 8" in text and f"| {98765 / 1740:.2f} |" in text


# --- verdicts, inputs and destinations ------------------------------------------------

def test_verdicts_say_why_a_record_fails_and_new_refuses_it(tmp_path, capsys):
    cases = [  # (losses, what the verdict names)
        ([3.2700], "only 1 run: no p-value"),
        ([3.2790, 3.2799, 3.2760], "is not below 0.01"),
        ([3.2810, 3.2820, 3.2830], "mean val_loss 3.282000 is not below the target 3.28"),
    ]
    for i, (losses, reason) in enumerate(cases):
        code, out, _ = run_cli(capsys, "stats", "--values", *losses, "--target", 3.28)
        assert code == 0 and "verdict: does NOT meet the record rule: " in out and reason in out
        (tmp_path / f"c{i}").mkdir()
        logs = write_runs(tmp_path / f"c{i}", losses, [1000] * len(losses))
        records = tmp_path / "records"
        code, out, err = run_cli(capsys, "new", "--track", "t", "--name", f"N{i}", "--records-dir", records, *logs)
        assert code == 2 and err.count("\n") == 1 and reason in err and "--allow-not-significant" in err
        assert not records.exists()
    code, _, err = run_cli(capsys, "new", "--allow-not-significant", "--track", "t", "--name", "N", "--date",
                           "2026-01-01", "--records-dir", records, *logs)
    assert code == 0, err
    assert "verdict: does NOT meet the record rule" in (records / "t" / "2026-01-01_N" / "README.md").read_text()
    code, out, _ = run_cli(capsys, "stats", "--values", *LOSSES, "--target", 3.28)
    assert "verdict: meets the record rule" in out


def test_times_must_match_values(capsys):
    code, out, err = run_cli(capsys, "stats", "--values", 3.27, 3.271, 3.272, "--target", 3.28, "--times", 1000, 1001)
    assert code == 2 and out == "" and err == ("error: --times has 2 values but --values has 3; "
                                               "give one time per run\n")


def test_index_reports_skipped_folders(tmp_path, capsys):
    logs = write_runs(tmp_path, LOSSES[:3], [1000, 1001, 1002])
    records = tmp_path / "records"
    run_cli(capsys, "new", "--allow-not-significant", "--track", "t", "--name", "Good", "--date", "2026-01-01",
            "--records-dir", records, *logs)
    (records / "t" / "notes").mkdir()
    (records / "t" / "2026-01-02_NoScript").mkdir()
    broken = records / "t" / "2026-01-03_Broken"
    broken.mkdir()
    (broken / "train_gpt.py").write_text("x = 1\n")
    code, out, _ = run_cli(capsys, "index", "--records-dir", records)
    assert code == 0
    assert f"skipped {records / 't' / 'notes'}: name is not <YYYY-MM-DD>_<Name>" in out
    assert f"skipped {records / 't' / '2026-01-02_NoScript'}: no train_gpt.py" in out
    assert f"skipped {broken}: listed without statistics: {broken}: no .txt logs in this folder" in out
    assert "Good" not in "".join(line for line in out.splitlines() if line.startswith("skipped"))


def test_new_readme_paths_work_from_the_repo_root(tmp_path, capsys, monkeypatch):
    from records import folders
    monkeypatch.setattr(folders, "REPO_ROOT", str(tmp_path))
    (tmp_path / "logs").mkdir()
    logs = write_runs(tmp_path / "logs", LOSSES, [1000] * 7)
    code, _, err = run_cli(capsys, "new", "--track", "t", "--name", "N", "--date", "2026-01-01",
                           "--records-dir", tmp_path / "elsewhere" / "recs", "--no-index", *logs)
    assert code == 0, err
    readme = (tmp_path / "elsewhere" / "recs" / "t" / "2026-01-01_N" / "README.md").read_text()
    assert "`python -m records reproduce elsewhere/recs/t/2026-01-01_N`" in readme
    assert "`python -m records stats elsewhere/recs/t/2026-01-01_N`" in readme
    # A destination outside the repository is named by its absolute path.
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    code, _, err = run_cli(capsys, "new", "--track", "t", "--name", "N", "--date", "2026-01-01",
                           "--records-dir", outside, "--no-index", *logs)
    assert code == 0 and f"reproduce {outside}/t/2026-01-01_N`" in (outside / "t" / "2026-01-01_N" / "README.md").read_text()


def test_unwritable_destination_is_named(tmp_path, capsys, monkeypatch):
    import tempfile

    def refuse(prefix, dir):
        raise PermissionError(13, "Permission denied", os.path.join(dir, prefix + "abc123"))
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    logs = write_runs(tmp_path, LOSSES, [1000] * 7)
    code, out, err = run_cli(capsys, "new", "--track", "t", "--name", "N", "--records-dir", tmp_path / "ro", *logs)
    assert code == 2 and err == f"error: {tmp_path / 'ro' / 't'}: cannot create the record there: Permission denied\n"


# --- reproduce: machine checks, logs found anywhere, dry runs --------------------------

def make_record(tmp_path, capsys, log_kw, name="R"):
    (tmp_path / "src").mkdir()
    logs = write_runs(tmp_path / "src", LOSSES[:2], [1000, 1001], **log_kw)
    records = tmp_path / "records"
    code, _, err = run_cli(capsys, "new", "--allow-not-significant", "--track", "t", "--name", name, "--date",
                           "2026-01-01", "--records-dir", records, "--no-index", *logs)
    assert code == 0, err
    return records / "t" / f"2026-01-01_{name}"


def test_reproduce_checks_the_machine_before_launching(tmp_path, capsys, monkeypatch):
    folder = make_record(tmp_path, capsys, {})  # 8x H100 record, torchrun --nproc_per_node=8
    monkeypatch.setattr(cli, "machine_devices", lambda: (0, 2))
    code, out, err = run_cli(capsys, "reproduce", folder, "--logs-dir", tmp_path / "new")
    assert code == 2 and out == "" and err == (f"error: {folder}: the record ran on cuda: 8x NVIDIA H100 80GB HBM3, "
                                               "and this machine has no CUDA GPU; run it on a GPU machine (or pass "
                                               "`-- --device cpu` to try this script on the CPU)\n")
    # A dry run only shows the commands: the same problem is a warning, and nothing is created.
    code, out, err = run_cli(capsys, "reproduce", folder, "--logs-dir", tmp_path / "new", "--dry-run")
    assert code == 0 and err.startswith("warning: ") and "has no CUDA GPU" in err and "--nproc_per_node=8" in out
    monkeypatch.setattr(cli, "machine_devices", lambda: (1, 16))
    code, out, err = run_cli(capsys, "reproduce", folder, "--logs-dir", tmp_path / "new")
    assert code == 2 and "starts 8 processes, one per GPU, and this machine has 1 CUDA GPU(s); " \
                         "pass --nproc-per-node 1" in err
    code, out, err = run_cli(capsys, "reproduce", folder, "--logs-dir", tmp_path / "new", "--nproc-per-node", 1,
                             "--dry-run")
    assert code == 0 and "--nproc_per_node=1" in out
    assert not (tmp_path / "new").exists()  # --dry-run creates nothing


def test_reproduce_dry_run_creates_no_logs_folder(tmp_path, capsys, monkeypatch):
    from records import folders
    folder = make_record(tmp_path, capsys, {"command": "python train_gpt.py --seed 0", "device": "cpu: x (2 cores)"})
    monkeypatch.setattr(folders, "REPO_ROOT", str(tmp_path / "repo"))
    code, out, err = run_cli(capsys, "reproduce", folder, "--dry-run")
    assert code == 0, err
    assert f"--log-dir {tmp_path / 'repo' / 'logs' / 'reproduce'}" in out
    assert not (tmp_path / "repo").exists()


def test_upstream_records_launch_without_our_options():
    log = parse_log_bytes(upstream_log_text(), "u.txt")
    argv = cli.launch_argv(log, "records/x/train_gpt.py", "id", "/tmp/l", [], nproc_per_node=2)
    assert argv[-2:] == ["--nproc_per_node=2", "records/x/train_gpt.py"] and "--run-id" not in argv
    assert cli.processes_of(argv) == 2


# A trainer that, like upstream scripts, ignores --run-id/--log-dir and writes logs/<its own id>.txt.
STUBBORN_TRAINER = FAKE_TRAINER.replace('a = p.parse_args()', 'a, _ = p.parse_known_args()\nimport uuid') \
    .replace('if not os.path.exists("data/sample/tinyshakespeare_val_000000.bin"):\n    sys.exit(', 'if 0:\n    (') \
    .replace('os.makedirs(a.log_dir, exist_ok=True)', 'a.log_dir, a.run_id = "logs", str(uuid.uuid4())\n'
             'os.makedirs(a.log_dir, exist_ok=True)')


def test_reproduce_finds_the_log_a_script_writes_on_its_own(tmp_path, capsys, monkeypatch):
    from records import folders
    assert "uuid.uuid4()" in STUBBORN_TRAINER and "sys.exit(" not in STUBBORN_TRAINER
    repo = tmp_path / "repo"
    repo.mkdir()
    trainer = tmp_path / "src" / "train_gpt.py"
    trainer.parent.mkdir()
    trainer.write_text(STUBBORN_TRAINER)
    subprocess.run([sys.executable, str(trainer), "--seed", "1"], cwd=tmp_path, check=True, timeout=60)
    (first,) = list((tmp_path / "logs").iterdir())
    records = tmp_path / "records"
    code, _, err = run_cli(capsys, "new", "--allow-not-significant", "--track", "cpu", "--name", "S", "--date",
                           "2026-01-01", "--records-dir", records, "--no-index", first)
    assert code == 0, err
    monkeypatch.setattr(folders, "REPO_ROOT", str(repo))
    code, out, err = run_cli(capsys, "reproduce", records / "cpu" / "2026-01-01_S", "--logs-dir", tmp_path / "new")
    assert code == 0, err
    (written,) = list((repo / "logs").iterdir())
    assert f"new logs: {written}" in out and "Welch p" in out
    assert parse_log(str(written)).script == trainer.read_bytes()
