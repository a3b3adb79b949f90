"""Parsing of the run logs that train_gpt.py writes (`logs/<run_id>.txt`).

A log is: the exact bytes of the script, a marker line
`==== end of script: sha256=<hex> bytes=<n> ====`, header lines (`key: value`,
`nvidia-smi:` continuing on indented lines, ending with `config: {json}`), then
body lines: `step:N/T train_time:…ms …`, `step:N/T val_loss:… …`, notes such as
`warmup:`/`peak memory:`, and finally `final: …` or, after a crash, `error: …`.
Every line is flushed as it is written, so a log may stop anywhere: the parser
keeps whatever is there and `missing()` says what is not.

Logs of the public modded-nanogpt records are read too (FORMAT_UPSTREAM): the script,
then a line made only of '=' characters, version lines and an nvidia-smi dump, then
`step:N/T val_loss:X train_time:Yms step_avg:Zms` and `step:N/T train_time:… step_avg:…`
lines (older ones with `train_loss:X` too). Such a log has no target, seed or command,
and the run finished when it validated at step T/T: that validation is its result.
The oldest of those logs also open with a '=' line, so their script lies between the
first two; logs of the llm.c era (`s:N tel:X` lines) carry no times and are refused.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field

TRAIN_GPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_gpt.py")


def script_marker_template(path: str = TRAIN_GPT) -> str:
    """train_gpt.END_OF_SCRIPT, the one definition of the marker, read from the source (importing
    train_gpt would import torch, which reading a log does not need)."""
    with open(path, "rb") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["END_OF_SCRIPT"]:
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{path} defines no END_OF_SCRIPT")


def _marker_pattern(template: str) -> re.Pattern:
    # The script contains the unformatted template, which the pattern cannot match because
    # it demands a hex digest and a decimal size.
    pattern = re.escape(template).replace(re.escape("{digest}"), "([0-9a-f]{64})").replace(re.escape("{size}"), r"(\d+)")
    return re.compile(("^" + pattern + r"\r?$").encode(), re.MULTILINE)


MARKER = _marker_pattern(script_marker_template())
STEP_LINE = re.compile(r"^step:(\d+)/(\d+)((?: \S+:\S+)*)\s*$")
HEADER_LINE = re.compile(r"^([A-Za-z_][\w-]*): ?(.*)$")
FORMAT_OURS = "speedrun"  # this repository's train_gpt.py
FORMAT_UPSTREAM = "modded-nanogpt"
# upstream writes "=" * 100; a shorter run of '=' (a Markdown underline, say) does not count.
SEPARATOR = re.compile(rb"^={20,}\r?$", re.MULTILINE)
UPSTREAM_STEP = re.compile(rb"^step:\d+/\d+ ", re.MULTILINE)
LLMC_STEP = re.compile(rb"^s:\d+ t[er]l:", re.MULTILINE)
NVIDIA_SMI_GPU = re.compile(r"^\|\s+\d+\s+(NVIDIA .+?|Tesla .+?)\s{2,}")
UPSTREAM_COMMAND = "torchrun --standalone --nproc_per_node={gpus} train_gpt.py"


class LogError(ValueError):
    """A file that is not a readable training log, or lacks what a command needs."""


@dataclass
class TrainStep:
    step: int
    total: int
    train_time_ms: float | None
    step_avg_ms: float | None
    train_loss: float | None
    extra: dict = field(default_factory=dict)  # eta, tokens/s, mfu, ...


@dataclass
class ValStep:
    step: int
    total: int
    val_loss: float
    train_time_ms: float | None
    step_avg_ms: float | None


@dataclass
class RunLog:
    path: str
    script: bytes
    script_sha256: str
    header: dict = field(default_factory=dict)
    config: dict | None = None
    train_steps: list = field(default_factory=list)
    val_steps: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # warmup:, peak memory:, checkpoint:, ...
    unparsed: list = field(default_factory=list)  # step lines this parser cannot read
    final_val_loss: float | None = None
    final_train_time_ms: float | None = None
    final_steps: int | None = None
    error: str | None = None
    problems: list = field(default_factory=list)  # damaged parts found while parsing
    format: str = FORMAT_OURS
    variant: str = ""  # how this file differs from the newest logs of its format, in words

    @property
    def finished(self) -> bool:
        return self.final_val_loss is not None

    @property
    def run_id(self) -> str:
        return self.header.get("run_id") or os.path.splitext(os.path.basename(self.path))[0]

    @property
    def command(self) -> str | None:
        return self.header.get("command")

    @property
    def argv(self) -> list | None:
        text = self.header.get("argv")
        if text is None:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(a, str) for a in value) else None

    @property
    def device(self) -> str | None:
        return self.header.get("device")

    def _int_header(self, key: str) -> int | None:
        try:
            return int(self.header[key])
        except (KeyError, ValueError):
            return None

    @property
    def world_size(self) -> int | None:
        return self._int_header("world_size")

    @property
    def gpus(self) -> int | None:
        """GPUs in the log's nvidia-smi listing (upstream logs record no world size)."""
        return self._int_header("gpus")

    @property
    def timed_steps(self) -> int | None:
        """The steps the final train time covers: the final validation's train_time / step_avg (a
        modded-nanogpt log leaves its first 10 steps off the clock), else the step count."""
        last = self.val_steps[-1] if self.val_steps else None
        if last is not None and last.step == self.final_steps and last.step_avg_ms and last.train_time_ms:
            return round(last.train_time_ms / last.step_avg_ms)
        return self.final_steps

    @property
    def format_description(self) -> str:
        return f"{self.format} log" + (f" ({self.variant})" if self.variant else "")

    @property
    def launch_command(self) -> str | None:
        """The recorded command; for upstream logs, which record none, modded-nanogpt's usual one."""
        if self.format == FORMAT_UPSTREAM:
            return UPSTREAM_COMMAND.format(gpus=self.gpus or 8)
        return self.command

    @property
    def target(self) -> float | None:
        value = (self.config or {}).get("target_val_loss")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def seed(self):
        return (self.config or {}).get("seed")

    def missing(self) -> list[str]:
        """Human-readable list of what a complete log has and this one lacks."""
        out = list(self.problems)
        if self.format == FORMAT_OURS:
            for key in ("run_id", "command", "argv", "world_size", "device"):
                if key not in self.header:
                    out.append(f"no '{key}:' header line")
            if self.config is None and "config" not in self.header:
                out.append("no 'config:' header line")
        if self.unparsed:
            out.append(f"{len(self.unparsed)} unreadable step line(s), e.g. {self.unparsed[0][:60]!r}")
        if not self.train_steps:
            out.append("no training step lines")
        if not self.val_steps:
            out.append("no validation lines")
        if not self.finished:
            if self.format == FORMAT_UPSTREAM:
                last = self.train_steps[-1] if self.train_steps else None
                out.append("no validation at the last step: the run did not finish"
                           + (f" (last step {last.step}/{last.total})" if last else ""))
                return out
            reason = "no final line: the run did not finish"
            if self.error:
                reason += f" ({self.error})"
            out.append(reason)
        return out

    def require_finished(self) -> None:
        if not self.finished and self.format == FORMAT_UPSTREAM:
            raise LogError(f"{self.path}: no validation at the last step (the run did not finish)")
        if not self.finished:
            reason = f"error: {self.error}" if self.error else "the run did not finish"
            raise LogError(f"{self.path}: no final line ({reason})")
        if self.final_train_time_ms is None:
            raise LogError(f"{self.path}: final line has no train_time_ms")


def _number(text: str) -> float | None:
    """`123ms` -> 123.0, `4.5%` -> 4.5, `nan` -> nan; None when not a number."""
    match = re.match(r"^([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+|nan|inf))", text)
    return float(match.group(1)) if match else None


def _fields(text: str) -> dict:
    """`a:1 b:2ms` -> {"a": "1", "b": "2ms"}."""
    out = {}
    for token in text.split():
        key, sep, value = token.partition(":")
        if sep:
            out[key] = value
    return out


def split_script(data: bytes, path: str) -> tuple[bytes, str, int]:
    """Return (script bytes, sha256, offset of the first byte after the marker line)."""
    for match in MARKER.finditer(data):
        digest, size = match.group(1).decode(), int(match.group(2))
        # The logger adds a newline only when the script does not end with one.
        start = match.start()
        if start not in (size, size + 1):
            continue
        script = data[:size]
        if hashlib.sha256(script).hexdigest() == digest:
            end = match.end()
            if data[end:end + 1] == b"\n":
                end += 1
            return script, digest, end
        raise LogError(f"{path}: embedded script does not match the sha256 in its end-of-script marker "
                       "(the log was edited or damaged)")
    raise LogError(f"{path}: not a training log: no valid '==== end of script: sha256=… bytes=… ====' marker")


def split_upstream(data: bytes, path: str) -> tuple[bytes, int, str] | None:
    """(script, offset of the body, variant) of a modded-nanogpt log; None when it is not one."""
    separators = list(SEPARATOR.finditer(data))
    if not separators:
        return None
    first = separators[0]
    if first.start() == 0:
        # The oldest logs frame the script with '=' lines, written as-is (no newline added).
        if len(separators) < 2:
            raise LogError(f"{path}: looks like an early modded-nanogpt log (it opens with a '=' line) but has no "
                           "second '=' line closing the script")
        script, body, variant = data[first.end() + 1:separators[1].start()], separators[1].end(), \
            "script between two '=' lines"
    else:
        script, body, variant = data[:first.start()], first.end(), ""
        # print(code) adds a newline after the file's own last one.
        if script.endswith(b"\n\n"):
            script = script[:-1]
    if not UPSTREAM_STEP.search(data, body):
        raise LogError(f"{path}: not a training log: it has a line of '=' characters like a modded-nanogpt log, "
                       "but no 'step:N/T ...' lines after it")
    return script, body, variant


def split_any(data: bytes, path: str) -> tuple[bytes, int, str, str]:
    """(script, body offset, format, variant) of a log in either format, or a LogError saying why it is neither."""
    if MARKER.search(data):
        script, _, offset = split_script(data, path)
        return script, offset, FORMAT_OURS, ""
    upstream = split_upstream(data, path)
    if upstream is not None:
        return upstream[0], upstream[1], FORMAT_UPSTREAM, upstream[2]
    if LLMC_STEP.search(data):
        raise LogError(f"{path}: an llm.c-era modded-nanogpt log ('s:N tel:X' lines): it records no training "
                       "times or script, so it cannot be read")
    raise LogError(f"{path}: not a training log: no valid '==== end of script: sha256=… bytes=… ====' marker "
                   "(this repository's logs) and no line of '=' characters followed by 'step:N/T' lines "
                   "(modded-nanogpt logs)")


def parse_log_bytes(data: bytes, path: str = "<log>") -> RunLog:
    script, offset, log_format, variant = split_any(data, path)
    if log_format == FORMAT_UPSTREAM:
        return _parse_upstream(data[offset:], path, script, variant)
    digest = hashlib.sha256(script).hexdigest()
    log = RunLog(path=path, script=script, script_sha256=digest)
    text = data[offset:].decode("utf-8", errors="replace")
    in_header = True
    last_key = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("error:"):
            log.error = line[len("error:"):].strip()
            in_header = False
            continue
        if in_header and last_key and line[:1].isspace():
            log.header[last_key] += "\n" + line  # continuation, e.g. nvidia-smi output
            continue
        if line.startswith("step:") or line.startswith("final:"):
            in_header = False
        if in_header:
            match = HEADER_LINE.match(line)
            if match:
                last_key, value = match.group(1), match.group(2)
                log.header[last_key] = value
                if last_key == "config":
                    _parse_config(log, value)
                    in_header = False  # config is the last header line
                continue
            in_header = False
        _parse_body_line(log, line)
    return log


def _parse_upstream(body: bytes, path: str, script: bytes, variant: str) -> RunLog:
    log = RunLog(path=path, script=script, script_sha256=hashlib.sha256(script).hexdigest(),
                 format=FORMAT_UPSTREAM, variant=variant)
    gpu_names = []
    for line in body.decode("utf-8", errors="replace").splitlines():
        if line.startswith("step:"):
            _parse_body_line(log, line)
        elif line.startswith("Running Python "):
            log.header["python"] = line[len("Running Python "):].split()[0]
        elif line.startswith("Running PyTorch ") or line.startswith("Running pytorch "):
            log.header["torch"] = line.split()[2]
        elif NVIDIA_SMI_GPU.match(line):
            gpu_names.append(NVIDIA_SMI_GPU.match(line).group(1).strip())
        elif line.startswith("peak memory"):
            log.notes.append(line)
    if gpu_names:
        log.header["gpus"] = str(len(gpu_names))
        log.header["device"] = "cuda: " + ", ".join(f"{gpu_names.count(n)}x {n}" for n in dict.fromkeys(gpu_names))
    if any(step.train_loss is not None for step in log.train_steps):
        log.variant = ", ".join(v for v in (variant, "train_loss on step lines") if v)
    last = log.val_steps[-1] if log.val_steps else None
    if last is not None and last.step == last.total:
        log.final_val_loss, log.final_train_time_ms, log.final_steps = last.val_loss, last.train_time_ms, last.total
    return log


def _parse_config(log: RunLog, value: str) -> None:
    try:
        config = json.loads(value)
    except json.JSONDecodeError:
        log.problems.append("config line is not valid JSON (truncated?)")
        return
    if isinstance(config, dict):
        log.config = config
    else:
        log.problems.append("config line is not a JSON object")


def _parse_body_line(log: RunLog, line: str) -> None:
    if line.startswith("final:"):
        values = _fields(line[len("final:"):])
        loss = _number(values.get("val_loss", ""))
        if loss is None:
            log.unparsed.append(line)
            log.problems.append("final line has no val_loss")
            return
        log.final_val_loss = loss
        log.final_train_time_ms = _number(values.get("train_time_ms", ""))
        steps = _number(values.get("steps", ""))
        log.final_steps = int(steps) if steps is not None and math.isfinite(steps) else None
        return
    if not line.startswith("step:"):
        log.notes.append(line)
        return
    match = STEP_LINE.match(line)
    if not match:
        log.unparsed.append(line)  # e.g. a line cut short by a crash
        return
    step, total = int(match.group(1)), int(match.group(2))
    values = _fields(match.group(3))
    time_ms, avg_ms = _number(values.pop("train_time", "")), _number(values.pop("step_avg", ""))
    if "val_loss" in values:
        loss = _number(values["val_loss"])
        if loss is None:
            log.unparsed.append(line)
            return
        log.val_steps.append(ValStep(step, total, loss, time_ms, avg_ms))
    else:
        loss = _number(values.pop("train_loss", ""))
        log.train_steps.append(TrainStep(step, total, time_ms, avg_ms, loss, values))


def parse_log(path: str) -> RunLog:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise LogError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_log_bytes(data, path)


def script_bytes(path: str) -> bytes:
    """The script a path stands for: a log's embedded script, a record folder's or a .py file's bytes."""
    if os.path.isdir(path):
        script = os.path.join(path, "train_gpt.py")
        if not os.path.isfile(script):
            logs = log_paths(path, required=False)
            if not logs:
                raise LogError(f"{path}: record folder has no train_gpt.py and no .txt logs")
            return parse_log(logs[0]).script  # folder_script_note says when the other logs differ
        path = script
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise LogError(f"{path}: cannot read: {e.strerror or e}") from None
    if path.endswith(".py"):
        return data
    return split_any(data, path)[0]


def folder_script_note(path: str) -> str | None:
    """For a folder without train_gpt.py whose logs embed different scripts: which one stands for it."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "train_gpt.py")):
        return None
    runs = [parse_log(p) for p in log_paths(path, required=False)]
    distinct = list(dict.fromkeys(run.script_sha256 for run in runs))
    if len(distinct) < 2:
        return None
    return (f"note: {path}: its {len(runs)} logs embed {len(distinct)} different scripts; "
            f"this is the first log's, {os.path.basename(runs[0].path)}")


def log_paths(source: str, required: bool = True) -> list[str]:
    """A record folder stands for its logs (`*.txt`); a file stands for itself."""
    if os.path.isdir(source):
        paths = sorted(os.path.join(source, name) for name in os.listdir(source) if name.endswith(".txt"))
        if not paths and required:
            raise LogError(f"{source}: no .txt logs in this folder")
        return paths
    if not os.path.exists(source):
        raise LogError(f"{source}: no such file or folder")
    return [source]


def load_runs(sources: list[str], require_finished: bool = True) -> list[RunLog]:
    runs = [parse_log(p) for s in sources for p in log_paths(s)]
    if require_finished:
        for run in runs:
            run.require_finished()
    return runs
