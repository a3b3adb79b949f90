"""`python -m records <command>`: create, check, compare, plot and reproduce records.

Errors are one line on stderr and exit code 2; `diff` exits 1 when the scripts
differ, like diff(1).
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys

from . import folders, stats
from .logs import (FORMAT_UPSTREAM, LogError, RunLog, folder_script_note, load_runs, log_paths, parse_log,
                   script_bytes)

# Options of train_gpt.py that reproduce sets itself, so a rerun never writes over a log.
OWN_OPTIONS = ("--run-id", "--run_id", "--log-dir", "--log_dir")
# Results, then every input that shaped them, so a JSON line can be recomputed on its own.
JSON_KEYS = ("n", "mean", "std", "ci99", "p_value", "target", "meets_rule", "problems",
             "time_mean", "time_std", "time_ci99", "ms_per_iter", "boot_frac_below_001",
             "losses", "times_ms", "iterations", "step_counts", "distinct_scripts", "boot_resamples",
             "boot_sample_size", "boot_seed", "sources")


class UsageError(ValueError):
    pass


# --- check ------------------------------------------------------------------------

def describe(run: RunLog) -> str:
    """One line: what a log holds, and what it lacks."""
    if run.finished:
        head = (f"finished: val_loss {run.final_val_loss:.4f}, "
                f"{stats.fmt(None if run.final_train_time_ms is None else run.final_train_time_ms / 1000, '.2f')} s, "
                f"{run.final_steps if run.final_steps is not None else 'n/a'} steps")
    else:
        last = run.train_steps[-1] if run.train_steps else None
        head = "partial: " + (f"last step {last.step}/{last.total}" if last else "no step")
        if run.val_steps:
            head += f", last val_loss {run.val_steps[-1].val_loss:.4f} at step {run.val_steps[-1].step}"
    missing = run.missing()
    return f"{run.path}: {run.format_description}, {head}" + (f"; missing: {'; '.join(missing)}" if missing else "")


def cmd_check(args) -> int:
    code = 0
    for source in args.logs:
        for path in log_paths(source):
            try:
                run = parse_log(path)
            except LogError as e:
                print(f"error: {e}", file=sys.stderr)
                code = 2
                continue
            print(describe(run))
            if run.missing() and code == 0:
                code = 1
    return code


# --- new / index ------------------------------------------------------------------

def cmd_new(args) -> int:
    folder = folders.new_record(args.logs, args.track, args.name, date=args.date, target=args.target,
                                records_dir=args.records_dir, allow_not_significant=args.allow_not_significant)
    print(f"created {folder}")
    print("next: fill in 'What changed and why' in its README.md")
    if not args.no_index:
        try:
            print(f"updated {folders.write_index(args.records_dir)}")
        except (LogError, OSError) as e:
            print(f"warning: record created, but the records table was not updated: {e}", file=sys.stderr)
            return 1
    return 0


def cmd_index(args) -> int:
    skipped = []
    print(f"updated {folders.write_index(args.records_dir, skipped)}")
    for line in skipped:
        print(f"skipped {line}")
    return 0


# --- stats ------------------------------------------------------------------------

def cmd_stats(args) -> int:
    if args.values and args.sources:
        raise UsageError("give logs/folders or --values, not both")
    if args.values:
        if args.target is None:
            raise UsageError("--values needs --target")
        if args.times and len(args.times) != len(args.values):
            raise UsageError(f"--times has {len(args.times)} values but --values has {len(args.values)}; "
                             "give one time per run")
        losses, times, target, iterations = args.values, args.times, args.target, args.iterations
    elif args.sources:
        if args.times:
            raise UsageError("--times goes with --values; logs carry their own times")
        runs = load_runs(args.sources)
        losses = [r.final_val_loss for r in runs]
        times = [r.final_train_time_ms for r in runs]
        target = args.target
        if target is None:
            folder = next((s for s in args.sources if os.path.isdir(s)), None)
            target = folders.folder_target(folder, runs) if folder else folders.common_target(runs)
        iterations = args.iterations or folders.iterations_of(runs)
    else:
        raise UsageError("give a record folder, logs, or --values")
    if args.bootstrap is not None and args.bootstrap < 1:
        raise UsageError("--bootstrap must be at least 1")
    if args.sample_size is not None and args.bootstrap is None:
        raise UsageError("--sample-size goes with --bootstrap")
    result = stats.record_stats(losses, target, times_ms=times, iterations=iterations, bootstrap=args.bootstrap,
                                sample_size=args.sample_size, seed=args.seed)
    if args.sources:
        result["sources"] = [r.path for r in runs]
        result["step_counts"] = [r.timed_steps for r in runs]
        result["distinct_scripts"] = len({r.script_sha256 for r in runs})
    if args.json:
        print(json.dumps({k: result[k] for k in JSON_KEYS if k in result}))
    else:
        print(stats.format_record_stats(result))
    return 0


# --- diff -------------------------------------------------------------------------

def cmd_diff(args) -> int:
    a, b = script_bytes(args.a), script_bytes(args.b)
    for note in filter(None, (folder_script_note(args.a), folder_script_note(args.b))):
        print(note, file=sys.stderr)
    if a == b:
        print(f"identical scripts ({len(a)} bytes)", file=sys.stderr)
        return 0
    lines = difflib.unified_diff(a.decode("utf-8", "replace").splitlines(keepends=True),
                                 b.decode("utf-8", "replace").splitlines(keepends=True),
                                 fromfile=args.a, tofile=args.b, n=args.context)
    for line in lines:
        sys.stdout.write(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return 1


# --- compare ----------------------------------------------------------------------

def comparison(a_runs: list[RunLog], b_runs: list[RunLog]) -> dict:
    def side(runs):
        times = stats.summarize([r.final_train_time_ms / 1000 for r in runs])
        losses = stats.summarize([r.final_val_loss for r in runs])
        return {"n": times.n, "time_mean_s": times.mean, "time_std_s": times.std,
                "loss_mean": losses.mean, "loss_std": losses.std,
                # the inputs, so the JSON can be checked on its own
                "logs": [r.path for r in runs], "times_ms": [r.final_train_time_ms for r in runs],
                "losses": [r.final_val_loss for r in runs]}
    a, b = side(a_runs), side(b_runs)
    return {
        "a": a, "b": b,
        "time_delta_s": b["time_mean_s"] - a["time_mean_s"],
        "time_delta_pct": 100 * (b["time_mean_s"] - a["time_mean_s"]) / a["time_mean_s"] if a["time_mean_s"] else None,
        "loss_delta": b["loss_mean"] - a["loss_mean"],
        "p_time": stats.welch_p([r.final_train_time_ms for r in a_runs], [r.final_train_time_ms for r in b_runs]),
        "p_loss": stats.welch_p([r.final_val_loss for r in a_runs], [r.final_val_loss for r in b_runs]),
    }


def format_comparison(c: dict, label_a: str, label_b: str) -> str:
    f = stats.fmt
    width = max(len(label_a), len(label_b), 6)
    rows = [f"{'':2} {'source':<{width}}  {'runs':>4}  {'time mean (s)':>13}  {'time std (s)':>12}  "
            f"{'loss mean':>9}  {'loss std':>8}"]
    for key, label in (("a", label_a), ("b", label_b)):
        s = c[key]
        rows.append(f"{key.upper():2} {label:<{width}}  {s['n']:>4}  {f(s['time_mean_s'], '.3f'):>13}  "
                    f"{f(s['time_std_s'], '.3f'):>12}  {f(s['loss_mean'], '.5f'):>9}  {f(s['loss_std'], '.5f'):>8}")
    pct = f" ({c['time_delta_pct']:+.2f}%)" if c["time_delta_pct"] is not None else ""
    rows.append(f"B - A: time {c['time_delta_s']:+.3f} s{pct}, Welch p = {stats.format_p(c['p_time'])}; "
                f"loss {c['loss_delta']:+.5f}, Welch p = {stats.format_p(c['p_loss'])}  (two-sided)")
    return "\n".join(rows)


def cmd_compare(args) -> int:
    if args.a or args.b:
        if args.sides or not (args.a and args.b):
            raise UsageError("use either `compare A B` or `compare --a LOG... --b LOG...`")
        a_sources, b_sources = args.a, args.b
        label_a = args.a[0] if len(args.a) == 1 else f"{len(args.a)} logs"
        label_b = args.b[0] if len(args.b) == 1 else f"{len(args.b)} logs"
    elif len(args.sides) == 2:
        a_sources, b_sources = [args.sides[0]], [args.sides[1]]
        label_a, label_b = args.sides
    else:
        raise UsageError("compare needs two sides: `compare A B` (folders or logs) or `--a LOG... --b LOG...`")
    c = comparison(load_runs(a_sources), load_runs(b_sources))
    print(json.dumps(c) if args.json else format_comparison(c, label_a, label_b))
    return 0


# --- plot -------------------------------------------------------------------------

def loss_axis_range(losses: list[float], target: float | None, zoom: float) -> tuple[float, float]:
    """Loss axis from just below the lowest loss (or target) to `zoom` above the target (or the lowest loss)."""
    top_ref = target if target is not None else min(losses)
    low = min([*losses, top_ref])
    high = max(top_ref + zoom, low + zoom)
    pad = 0.05 * (high - low)
    return low - pad, high


def draw_curves(records: list[str], zoom: float | None, ylim=None, target: float | None = None):
    """The figure of `plot`: val loss against time and against step, one colour per record."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    plotted, targets, losses, labels = 0, set(), [], []
    for i, record in enumerate(records):
        label = os.path.basename(os.path.normpath(record))
        color = colors[i % len(colors)]
        for j, path in enumerate(log_paths(record)):
            run = parse_log(path)
            targets.add(run.target)
            points = [v for v in run.val_steps if v.train_time_ms is not None]
            if not points:
                print(f"warning: {path}: no validation lines to plot", file=sys.stderr)
                continue
            kwargs = {"color": color, "alpha": 0.8, "marker": ".", "label": label if j == 0 else None}
            by_time.plot([v.train_time_ms / 1000 for v in points], [v.val_loss for v in points], **kwargs)
            by_step.plot([v.step for v in points], [v.val_loss for v in points], **kwargs)
            losses += [v.val_loss for v in points]
            plotted += 1
        labels.append(label)
    if not plotted:
        plt.close(fig)
        raise UsageError("nothing to plot: no log has validation lines")
    targets.discard(None)  # upstream logs carry no target
    if target is None:
        target = targets.pop() if len(targets) == 1 else None  # only a target all runs share is drawn
    for axis, xlabel in ((by_time, "training time (s)"), (by_step, "step")):
        if target is not None:
            axis.axhline(target, color="gray", ls="--", lw=1, label=f"target {target:g}")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("val loss")
        axis.grid(alpha=0.3)
        axis.legend()
        if ylim:
            axis.set_ylim(*ylim)
        elif zoom is not None:
            axis.set_ylim(*loss_axis_range([x for x in losses if math.isfinite(x)], target, zoom))
    title = "val loss: " + " vs ".join(labels) + (f" (target {target:g})" if target is not None else "")
    fig.suptitle(title)
    fig.tight_layout()
    return fig, plotted


def cmd_plot(args) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("plot needs matplotlib, which is not installed: pip install matplotlib") from None
    import matplotlib.pyplot as plt
    fig, plotted = draw_curves(args.records, None if args.full_range else args.zoom, args.ylim, args.target)
    fig.savefig(args.output, dpi=120)
    plt.close(fig)
    print(f"wrote {args.output} ({plotted} run(s))")
    return 0


# --- reproduce --------------------------------------------------------------------

def strip_options(argv: list[str], names) -> list[str]:
    """argv without `--name value` / `--name=value` for the given option names."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not any(arg.startswith(name + "=") for name in names):
            out.append(arg)
    return out


def launch_argv(run: RunLog, script: str, run_id: str, log_dir: str, extra: list[str],
                nproc_per_node: int | None = None) -> list[str]:
    """The recorded launch (python or torchrun), pointed at `script` and at a fresh run id and log dir.

    Upstream scripts take no such options (they write logs/<uuid>.txt themselves), so they get none.
    """
    command = run.launch_command
    if not command:
        raise LogError(f"{run.path}: no 'command:' header line; cannot tell how the run was launched")
    words = shlex.split(command)
    at = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
    if at is None or at == 0:
        raise LogError(f"{run.path}: cannot find the script in the command line {command!r}")
    launcher, args = words[:at], run.argv if run.argv is not None else words[at + 1:]
    program = os.path.basename(launcher[0])
    if program.startswith("python"):
        launcher = [sys.executable] + launcher[1:]
    elif program == "torchrun":
        # torchrun may not be on PATH even where torch is installed; its module is the same program.
        found = shutil.which("torchrun")
        launcher = ([found] if found else [sys.executable, "-m", "torch.distributed.run"]) + launcher[1:]
        if nproc_per_node is not None:
            launcher = strip_options(launcher, ("--nproc_per_node", "--nproc-per-node"))
            launcher.append(f"--nproc_per_node={nproc_per_node}")
    else:
        raise LogError(f"{run.path}: unknown launcher {launcher[0]!r} in {command!r}")
    own = [] if run.format == FORMAT_UPSTREAM else ["--run-id", run_id, "--log-dir", log_dir]
    return launcher + [script] + strip_options(args, OWN_OPTIONS) + extra + own


def processes_of(argv: list[str]) -> int:
    """Processes a launch starts: torchrun's --nproc_per_node (1 when absent), else 1."""
    for i, arg in enumerate(argv):
        for name in ("--nproc_per_node", "--nproc-per-node"):
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(name + "="):
                value = arg[len(name) + 1:]
            else:
                continue
            if not value.isdigit():
                raise LogError(f"{name}={value}: reproduce needs a number of processes ('gpu'/'auto' are not "
                               "checked); pass --nproc-per-node N")
            return int(value)
    return 1


def machine_devices() -> tuple[int, int]:
    """(CUDA GPUs, CPU cores) of this machine."""
    import torch  # imported here: the other commands do not need it
    return (torch.cuda.device_count() if torch.cuda.is_available() else 0), (os.cpu_count() or 1)


def check_machine(run: RunLog, argv: list[str], extra: list[str], folder: str) -> None:
    """Refuse, in one line, a launch this machine cannot run, before torchrun turns it into a traceback."""
    processes = processes_of(argv)
    gpus, cores = machine_devices()
    device = run.device or ("cuda" if run.format == FORMAT_UPSTREAM else "")
    forced_cpu = any(a in ("--device=cpu",) for a in extra) or any(
        a == "--device" and b == "cpu" for a, b in zip(extra, extra[1:]))
    if device.startswith("cuda") and not forced_cpu:
        if gpus == 0:
            hint = "" if run.format == FORMAT_UPSTREAM else " (or pass `-- --device cpu` to try this script on the CPU)"
            raise LogError(f"{folder}: the record ran on {device}, and this machine has no CUDA GPU; run it on a "
                           f"GPU machine{hint}")
        if processes > gpus:
            raise LogError(f"{folder}: the record's command starts {processes} processes, one per GPU, and this "
                           f"machine has {gpus} CUDA GPU(s); pass --nproc-per-node {gpus}")
    elif processes > cores:
        raise LogError(f"{folder}: the record's command starts {processes} processes and this machine has "
                       f"{cores} CPU core(s); pass --nproc-per-node {cores}")


def planned_logs_dir(folder: str) -> str:
    """A new logs/reproduce/<record>_<time> path (not created here, so --dry-run leaves nothing behind)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    base = os.path.join(folders.REPO_ROOT, "logs", "reproduce", f"{os.path.basename(os.path.normpath(folder))}_{stamp}")
    path, k = base, 1
    while os.path.exists(path):
        path, k = f"{base}_{k}", k + 1
    return path


def text_files(*roots: str) -> dict:
    """{path: mtime} of every .txt under the given folders."""
    found = {}
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                if name.endswith(".txt"):
                    path = os.path.join(directory, name)
                    found[path] = os.path.getmtime(path)
    return found


def find_new_log(expected: str, before: dict, roots: list[str], run_number: int) -> str:
    """The log a run wrote: where it was told to write it, else the newest .txt that appeared under `roots`."""
    if os.path.exists(expected):
        return expected
    new = sorted((p for p, mtime in text_files(*roots).items() if before.get(p) != mtime),
                 key=lambda p: os.path.getmtime(p))
    if not new:
        raise LogError(f"run {run_number} wrote no log: not at {expected}, and no new .txt under "
                       + ", ".join(roots))
    if len(new) > 1:
        print(f"note: run {run_number} left {len(new)} new .txt files; taking the newest", file=sys.stderr)
    return new[-1]


def cmd_reproduce(args) -> int:
    folder = args.folder
    script = os.path.join(folder, "train_gpt.py")
    if not os.path.isfile(script):
        raise LogError(f"{folder}: not a record folder (no train_gpt.py)")
    record_runs = load_runs([folder])
    if args.runs < 1:
        raise UsageError("--runs must be at least 1")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise UsageError("--nproc-per-node must be at least 1")
    logs_dir = os.path.abspath(args.logs_dir) if args.logs_dir else planned_logs_dir(folder)
    plans = []
    for i in range(args.runs):
        source = record_runs[i % len(record_runs)]  # reruns cycle through the record's runs (and seeds)
        run_id = f"repro{i}_{source.run_id}"
        log_path = os.path.join(logs_dir, f"{run_id}.txt")
        if os.path.exists(log_path):
            raise UsageError(f"{log_path} already exists; choose another --logs-dir")
        argv = launch_argv(source, folders.repo_path(script), run_id, logs_dir, args.extra, args.nproc_per_node)
        plans.append((argv, log_path))
    try:
        check_machine(record_runs[0], plans[0][0], args.extra, folder)
    except LogError as e:
        if not args.dry_run:
            raise
        print(f"warning: {e}", file=sys.stderr)  # a dry run only shows the commands, so it may be made anywhere
    new_logs = []
    # Scripts that ignore --log-dir write where they like; upstream ones write logs/<uuid>.txt from the cwd.
    roots = [logs_dir, os.path.join(folders.REPO_ROOT, "logs")]
    for i, (command, log_path) in enumerate(plans):
        print(f"[{i + 1}/{len(plans)}] (cwd {folders.REPO_ROOT}) {shlex.join(command)}", flush=True)
        if args.dry_run:
            continue
        os.makedirs(logs_dir, exist_ok=True)
        before = text_files(*roots)
        code = subprocess.run(command, cwd=folders.REPO_ROOT).returncode
        if code != 0:
            where = log_path if os.path.exists(log_path) else "see the output above"
            raise LogError(f"run {i + 1} failed with exit code {code}; log: {where}")
        new_logs.append(find_new_log(log_path, before, roots, i + 1))
    if args.dry_run:
        return 0
    script_of_new = parse_log(new_logs[0]).script
    if script_of_new != record_runs[0].script:
        print("warning: the new logs embed a script that differs from the record's", file=sys.stderr)
    print("new logs: " + " ".join(new_logs))
    c = comparison(record_runs, load_runs(new_logs))
    print(format_comparison(c, f"record {os.path.basename(os.path.normpath(folder))}", f"reproduction ({logs_dir})"))
    return 0


# --- entry point ------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m records", description=__doc__.splitlines()[0],
                                     epilog="Run `python -m records COMMAND --help` for each command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("check", help="what each log holds and lacks (partial or crashed runs)",
                       description="Parse logs and say, one line each, what they hold and what is missing (for "
                                   "example 'no final line: the run did not finish'). Exit 0 when all are complete, "
                                   "1 when any lacks something, 2 when one is not a training log.")
    p.add_argument("logs", nargs="+", metavar="LOG|FOLDER")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("new", help="create a record folder from logs",
                       description="Create records/<track>/<date>_<name>/ with README.md, train_gpt.py (taken from the "
                                   "logs, which must all embed the same script) and the logs. Never overwrites.")
    p.add_argument("--track", required=True, help="e.g. short, medium, cpu")
    p.add_argument("--name", required=True, help="short CamelCase name of the change")
    p.add_argument("--date", help="YYYY-MM-DD (default: today)")
    p.add_argument("--target", type=float, help="target val loss (default: the logs' config target_val_loss)")
    p.add_argument("--records-dir", default=folders.RECORDS_DIR, help="where track folders live (default: %(default)s)")
    p.add_argument("--no-index", action="store_true", help="do not regenerate the table in records/README.md")
    p.add_argument("--allow-not-significant", action="store_true",
                   help="create the record even if it does not meet the rule (fewer than 2 runs, mean not below "
                        "target, or p >= 0.01); its README says so")
    p.add_argument("logs", nargs="+", metavar="LOG", help="finished run logs (logs/<run_id>.txt)")
    p.set_defaults(func=cmd_new)

    p = sub.add_parser("stats", help="record statistics: mean, std, 99%% CI, one-sided t-test, bootstrap",
                       description="Statistics of final val losses (and training times) against a target: n, mean, "
                                   "sample std, 99% t-interval, one-sided one-sample t-test p (H1: mean < target).")
    p.add_argument("sources", nargs="*", metavar="FOLDER|LOG", help="record folders and/or logs (finished runs)")
    p.add_argument("--values", nargs="+", type=float, metavar="V", help="final val losses instead of logs")
    p.add_argument("--times", nargs="+", type=float, metavar="MS",
                   help="with --values: training times in ms (as in the logs' final train_time_ms)")
    p.add_argument("--target", type=float, help="target val loss (default from logs: the record README's "
                                               "'Target val_loss:' line, else config target_val_loss)")
    p.add_argument("--iterations", type=int, help="steps per run, for ms per iteration (default from logs)")
    p.add_argument("--bootstrap", type=int, metavar="B", help="number of bootstrap resamples")
    p.add_argument("--sample-size", type=int, metavar="S", help="runs per bootstrap resample (default: n)")
    p.add_argument("--seed", type=int, default=0, metavar="K", help="bootstrap seed (numpy default_rng; default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("diff", help="unified diff of two records' scripts",
                       description="Unified diff of two scripts; A and B are each a record folder, a log or a .py "
                                   "file. Exit 0 when identical, 1 when different.")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("-U", "--context", type=int, default=3, help="lines of context (default 3)")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("compare", help="A/B table of times and losses with Welch's t-test",
                       description="Compare two sets of finished runs: `compare A B` with A and B each a record "
                                   "folder or a log, or `compare --a LOG... --b LOG...`. p values are two-sided "
                                   "Welch t-tests (unequal variances).")
    p.add_argument("sides", nargs="*", metavar="A B")
    p.add_argument("--a", nargs="+", metavar="LOG", help="side A: logs and/or folders")
    p.add_argument("--b", nargs="+", metavar="LOG", help="side B: logs and/or folders")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plot", help="val loss vs time and vs step (needs matplotlib)",
                       description="Plot every run's validation loss against training time and against step, one "
                                   "colour per record (folder or log). Needs matplotlib.")
    p.add_argument("records", nargs="+", metavar="RECORD")
    p.add_argument("-o", "--output", required=True, metavar="FILE.png")
    p.add_argument("--ylim", nargs=2, type=float, metavar=("LOW", "HIGH"), help="val loss axis range")
    p.add_argument("--zoom", type=float, default=0.5, metavar="DELTA",
                   help="by default the loss axis shows from just below the lowest loss (or the target) to DELTA "
                        "above the target (default %(default)s); the early losses near 10.8 would flatten the rest")
    p.add_argument("--full-range", action="store_true", help="show every loss, from step 0")
    p.add_argument("--target", type=float, help="target line (default: the logs' target when they share one)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("reproduce", help="rerun a record's script and compare with the record",
                       usage="python -m records reproduce FOLDER [options] [-- EXTRA_TRAIN_ARGS...]",
                       description="Run the record's own train_gpt.py with the command recorded in its logs (python "
                                   "or torchrun), from the repository root so relative data paths resolve, with "
                                   "--run-id/--log-dir pointed into a fresh logs folder; then compare the new runs "
                                   "with the record. Arguments after `--` are passed to train_gpt.py.")
    p.add_argument("folder", metavar="FOLDER")
    p.add_argument("--logs-dir", help="where the new logs go (default: a new logs/reproduce/<record>_<time>/)")
    p.add_argument("--runs", type=int, default=1, help="number of runs; they cycle through the record's runs' "
                                                       "commands, so seeds match (default 1)")
    p.add_argument("--nproc-per-node", type=int, help="for torchrun records: GPUs to use on this machine")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them; creates nothing")
    p.set_defaults(func=cmd_reproduce, extra=[])

    p = sub.add_parser("index", help="regenerate the records table in records/README.md",
                       description="Rebuild the table of every record folder in records/README.md from the folders.")
    p.add_argument("--records-dir", default=folders.RECORDS_DIR, help="default: %(default)s")
    p.set_defaults(func=cmd_index)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if argv[:1] == ["reproduce"] and "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if extra:
        args.extra = extra
    try:
        return args.func(args)
    except ValueError as e:  # LogError and UsageError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
