"""GPT speedrun trainer: the whole recipe in one file.

Sections, in data-flow order:
  1. Configuration and presets
  2. Data: shard format, BOS-aligned training loader, validation loader, synthetic data
  3. Model: attention backends, FP8 head, GPT
  4. Orthogonalisation: Newton-Schulz, Polar Express, Triton kernels
  5. Optimisers: Muon/NorMuon, DistAdam, Snoo, the optimiser set
  6. Schedules: batch size, window, learning rate, momentum
  7. Logging
  8. Checkpoints
  9. Training loop and entry point

Run a record:  torchrun --standalone --nproc_per_node=8 train_gpt.py
CPU demo:      python train_gpt.py --preset cpu
Importing this file never starts training.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import sys
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================
# 1. Configuration and presets
# =============================================================================
# One flat dataclass so any field can be overridden from the command line
# (`--field value`). Defaults are the short-track record (2025-12-21) recipe.


@dataclass
class Config:
    # --- run -----------------------------------------------------------------
    preset: str = "short"
    seed: int = 0
    run_id: str = ""  # empty: generated from time and seed
    log_dir: str = "logs"
    target_val_loss: float = 3.28
    device: str = "auto"  # auto | cuda | cpu
    compile: bool = True  # torch.compile the model (CUDA only)

    # --- data ----------------------------------------------------------------
    data: str = "fineweb"  # fineweb | synthetic
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    bos_id: int = 50256
    max_seq_len: int = 2048
    repeat_data: bool = False  # start the train shards again when they run out (small samples)
    # Every step's global batch is cut into this many BOS-aligned slices; each
    # rank takes slices/world_size of them as gradient-accumulation micro-steps,
    # so 1, 2, 4 or 8 ranks see exactly the same data.
    batch_slices: int = 8
    val_tokens: int = 10_485_760
    val_batch_tokens: int = 4 * 64 * 1024 * 8

    # --- model ---------------------------------------------------------------
    vocab_size: int = 50257
    vocab_pad_multiple: int = 128
    num_layers: int = 11
    model_dim: int = 768
    num_heads: int = 6
    head_dim: int = 128
    mlp_ratio: int = 4
    window_block: int = 128  # windows are counted in blocks of this many tokens
    # (model fields: see section 3)
    # --- end model -----------------------------------------------------------

    # --- optimisers ----------------------------------------------------------
    optimizer: str = "normuon"  # normuon | adamw (plain AdamW-on-everything baseline)
    # (optimiser fields: see sections 4-5)
    # --- end optimisers ------------------------------------------------------

    # --- schedules -----------------------------------------------------------
    num_iterations: int = 1960  # scheduled steps
    extension_iterations: int = 40  # extra steps at the final batch/window
    batch_tokens_stages: tuple = (131_072, 262_144, 393_216)  # one per third
    batch_tokens_extension: int = 393_216
    long_window_blocks_stages: tuple = (3, 7, 11)  # one per third
    long_window_blocks_extension: int = 13
    long_window_blocks_final_val: int = 20
    window_schedule: str = "stages"  # stages | cubic (medium track)
    window_cubic_max_tokens: int = 3456
    lr_stage_multipliers: tuple = (1.0, 1.51, 1.93)
    cooldown_frac: float = 0.55
    lr_min_frac: float = 0.1
    momentum_warmup_steps: int = 300
    momentum_cooldown_steps: int = 50
    momentum_min: float = 0.85
    momentum_max: float = 0.95
    adam_every: int = 2  # Adam groups step every N steps (gradients summed over them)
    scalar_pause_steps: int = 40  # scalar Adam ignores gradients this long after a transition

    # --- evaluation, logging, checkpoints -------------------------------------
    val_every: int = 250
    log_every: int = 1
    checkpoint_every: int = 0  # 0: never
    checkpoint_dir: str = "checkpoints"
    resume: str = ""
    warmup_steps: int = 10  # untimed compile/warm-up steps, state restored afterwards
    dist_timeout_s: int = 300


PRESETS: dict[str, dict] = {
    "short": {},
    "medium": {
        # medium model
        # end medium model
        # medium optimisers
        # end medium optimisers
        # medium schedules
        # end medium schedules
    },
    "cpu": {  # a real run on data/sample in a few minutes on a laptop CPU
        # cpu model
        # end cpu model
        # cpu optimisers
        # end cpu optimisers
        # cpu schedules
        # end cpu schedules
    },
    "test": {  # the smallest model of the same architecture, for the test suite
        # test model
        # end test model
        # test optimisers
        # end test optimisers
        # test schedules
        # end test schedules
    },
}


def config_from_args(argv: list[str] | None = None) -> Config:
    """Parse `--preset NAME` plus `--field value` overrides into a Config."""
    names = [f.name for f in fields(Config)]
    parser = argparse.ArgumentParser(
        description="GPT speedrun trainer. Any Config field can be overridden with --field value "
        "(dashes or underscores). Presets: " + ", ".join(PRESETS),
        allow_abbrev=False,
    )
    defaults = Config()
    for f in fields(Config):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, "--" + f.name, dest=f.name, default=None, metavar=type(default).__name__.upper(),
                            help=f"default {default!r}")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        bad = unknown[0]
        raise SystemExit(f"error: unknown option {bad!r}; valid options are --preset and --<field> for fields: "
                         + ", ".join(names))
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    preset = overrides.get("preset", defaults.preset)
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    cfg = dataclasses.replace(defaults, **PRESETS[preset])
    cfg.preset = preset
    for name, text in overrides.items():
        setattr(cfg, name, parse_field_value(name, text, getattr(defaults, name)))
    return cfg


def parse_field_value(name: str, text: str, default):
    """Convert a command-line string to the type of the field's default."""
    try:
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, tuple):
            return tuple(type(default[0])(x) if default else float(x) for x in text.split(",") if x)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        return text
    except ValueError:
        raise SystemExit(f"error: --{name} expects {type(default).__name__}, got {text!r}") from None


# =============================================================================
# 2. Data
# =============================================================================
# Shard file: 256 little-endian int32 header words [magic, version, num_tokens,
# 0...] followed by num_tokens uint16 tokens.

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_WORDS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_WORDS * 4


class DataError(ValueError):
    """A data file or data setting is unusable; the message names the culprit."""


def write_shard(path: str, tokens) -> None:
    """Write tokens (values < 65536) as a shard, atomically."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise DataError(f"{path}: token ids must fit in uint16")
    header = np.zeros(SHARD_HEADER_WORDS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def read_shard_header(path: str) -> int:
    """Validate a shard's header and size; return its token count."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(SHARD_HEADER_BYTES)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror or e})") from None
    if len(raw) < SHARD_HEADER_BYTES:
        raise DataError(f"{path}: shard is {size} bytes, shorter than its {SHARD_HEADER_BYTES}-byte header")
    magic, version, num_tokens = np.frombuffer(raw, dtype="<i4", count=3).tolist()
    if magic != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic number {magic} (expected {SHARD_MAGIC}); not a token shard")
    if version != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {version} (expected {SHARD_VERSION})")
    expected = SHARD_HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        raise DataError(f"{path}: file is {size} bytes but its header says {num_tokens} tokens "
                        f"({expected} bytes); the shard is truncated or corrupt")
    return num_tokens


def load_shard(path: str) -> np.ndarray:
    """Validated, memory-mapped uint16 tokens of one shard."""
    num_tokens = read_shard_header(path)
    if num_tokens == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(num_tokens,))


def list_shards(pattern: str, what: str) -> list[str]:
    """Sorted files matching a glob, each header-checked; fails on an empty glob."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"no {what} files match {pattern!r} (download FineWeb with "
                        "`python data/cached_fineweb10B.py`, or point --{what}-files at your shards)")
    for path in files:
        read_shard_header(path)
    return files


@dataclass
class MicroBatch:
    """One rank's share of one gradient-accumulation micro-step."""
    inputs: torch.Tensor  # (T,) int64
    targets: torch.Tensor  # (T,) int64
    cu_seqlens: torch.Tensor  # (num_seqs + 1,) int32: document/sequence starts and T
    max_seqlen: int


def pack_sequences(pieces: list[np.ndarray], device) -> MicroBatch:
    """Concatenate sequences (each starting at BOS) into a shifted input/target pair."""
    buf = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
    lengths = [len(p) for p in pieces]
    lengths[-1] -= 1  # the final token is only a target
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    cu = torch.from_numpy(starts)
    return MicroBatch(buf[:-1].to(device, non_blocking=True), buf[1:].to(device, non_blocking=True),
                      cu.to(device, non_blocking=True), int(max(lengths)))


class DocumentStream:
    """Walks the train shards document by document, in order, across shard ends.

    Every rank runs an identical stream so all agree on where each slice starts;
    only the slices a rank owns are materialised as tensors.
    """

    def __init__(self, files: list[str], bos_id: int, repeat: bool = False):
        self.files, self.bos_id, self.repeat = files, bos_id, repeat
        self.shard_index, self.doc_index, self.epoch = 0, 0, 0
        self._open(0)

    def _open(self, shard_index: int) -> None:
        self.tokens = load_shard(self.files[shard_index])
        self.doc_starts = np.flatnonzero(np.asarray(self.tokens) == self.bos_id)
        self.shard_index = shard_index

    def state(self) -> dict:
        return {"shard_index": self.shard_index, "doc_index": self.doc_index, "epoch": self.epoch}

    def load_state(self, state: dict) -> None:
        self._open(state["shard_index"])
        self.doc_index, self.epoch = state["doc_index"], state["epoch"]

    def next_sequence(self, max_len: int) -> np.ndarray:
        """The next document, cut to max_len tokens; moves to the next shard when needed."""
        shards_opened = 0
        while self.doc_index >= len(self.doc_starts):
            next_shard = self.shard_index + 1
            if next_shard >= len(self.files):
                if not self.repeat:
                    raise DataError(f"training data exhausted: all {len(self.files)} train shard(s) were used "
                                    "(download more shards, train for fewer steps, or set --repeat-data true)")
                next_shard, self.epoch = 0, self.epoch + 1
            shards_opened += 1
            if shards_opened > len(self.files):
                raise DataError(f"no document start (token {self.bos_id}) in any train shard: {self.files}")
            self._open(next_shard)
            self.doc_index = 0
        start = int(self.doc_starts[self.doc_index])
        end = int(self.doc_starts[self.doc_index + 1]) if self.doc_index + 1 < len(self.doc_starts) else len(self.tokens)
        self.doc_index += 1
        return self.tokens[start:min(end, start + max_len)]

    def next_slice(self, num_tokens: int, max_seq_len: int) -> list[np.ndarray]:
        """Sequences totalling exactly num_tokens + 1 tokens (one extra for the shifted targets)."""
        pieces, need = [], num_tokens + 1
        while need > 0:
            piece = self.next_sequence(min(max_seq_len, need))
            pieces.append(piece)
            need -= len(piece)
        return pieces


class TrainLoader:
    """Distributed, BOS-aligned training batches.

    A step of `batch_tokens` global tokens is cut into `slices` consecutive slices of
    batch_tokens/slices tokens. Rank r takes slices r, r+W, r+2W, ...: one per
    gradient-accumulation micro-step. The batch size may change from step to step.
    """

    def __init__(self, pattern: str, rank: int, world_size: int, *, slices: int, max_seq_len: int,
                 bos_id: int, repeat: bool = False, device="cpu"):
        if slices % world_size:
            raise DataError(f"batch_slices={slices} is not divisible by world size {world_size}")
        self.stream = DocumentStream(list_shards(pattern, "train"), bos_id, repeat)
        self.rank, self.world_size, self.slices = rank, world_size, slices
        self.max_seq_len, self.device = max_seq_len, device

    def next_step(self, batch_tokens: int) -> list[MicroBatch]:
        if batch_tokens % self.slices:
            raise DataError(f"batch of {batch_tokens} tokens is not divisible into {self.slices} slices")
        slice_tokens = batch_tokens // self.slices
        micro = []
        for i in range(self.slices):
            pieces = self.stream.next_slice(slice_tokens, self.max_seq_len)
            if i % self.world_size == self.rank:
                micro.append(pack_sequences(pieces, self.device))
        return micro

    def state_dict(self) -> dict:
        return self.stream.state()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state(state)


class SyntheticLoader:
    """Random tokens in BOS-separated documents, generated on the fly (for speed tests)."""

    def __init__(self, rank: int, world_size: int, *, slices: int, max_seq_len: int, bos_id: int,
                 vocab_size: int, seed: int = 0, device="cpu"):
        if slices % world_size:
            raise DataError(f"batch_slices={slices} is not divisible by world size {world_size}")
        self.rank, self.world_size, self.slices = rank, world_size, slices
        self.max_seq_len, self.bos_id, self.vocab_size = max_seq_len, bos_id, vocab_size
        self.device, self.seed, self.step = device, seed, 0

    def next_step(self, batch_tokens: int) -> list[MicroBatch]:
        slice_tokens = batch_tokens // self.slices
        micro = []
        for i in range(self.rank, self.slices, self.world_size):
            rng = np.random.default_rng([self.seed, self.step, i])
            tokens = rng.integers(0, self.bos_id, size=slice_tokens + 1, dtype=np.int64)
            pieces, pos = [], 0
            while pos < len(tokens):
                length = int(min(rng.integers(50, 2000), self.max_seq_len, len(tokens) - pos))
                piece = tokens[pos:pos + length].copy()
                piece[0] = self.bos_id
                pieces.append(piece)
                pos += length
            micro.append(pack_sequences(pieces, self.device))
        self.step += 1
        return micro

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def validation_batches(pattern: str, rank: int, world_size: int, *, val_tokens: int, batch_tokens: int,
                       bos_id: int, device="cpu"):
    """Yield this rank's micro-batches of the first val_tokens validation tokens, read sequentially.

    Sequences are not BOS-aligned; cu_seqlens still splits at every BOS so attention
    stays inside documents.
    """
    if val_tokens % batch_tokens or batch_tokens % world_size:
        raise DataError(f"val_tokens={val_tokens} must be a multiple of val_batch_tokens={batch_tokens}, "
                        f"itself a multiple of the world size {world_size}")
    tokens = np.concatenate([np.asarray(load_shard(p)) for p in list_shards(pattern, "val")])
    if len(tokens) < val_tokens + 1:
        raise DataError(f"validation files {pattern!r} hold {len(tokens)} tokens; need val_tokens+1 = {val_tokens + 1}")
    per_rank = batch_tokens // world_size
    for step in range(val_tokens // batch_tokens):
        start = step * batch_tokens + rank * per_rank
        chunk = tokens[start:start + per_rank + 1]
        cuts = np.flatnonzero(chunk[1:-1] == bos_id) + 1  # document starts inside the chunk
        bounds = np.concatenate([[0], cuts, [len(chunk)]])
        yield pack_sequences([chunk[a:b] for a, b in zip(bounds[:-1], bounds[1:])], device)


# =============================================================================
# 3. Model
# =============================================================================
# (model section: attention backends, FP8 head, GPT)
# --- end model section ---


# =============================================================================
# 4. Orthogonalisation
# =============================================================================
# (orthogonalisation section)
# --- end orthogonalisation section ---


# =============================================================================
# 5. Optimisers
# =============================================================================
# (optimiser section)
# --- end optimiser section ---


# =============================================================================
# 6. Schedules
# =============================================================================


# =============================================================================
# 7. Logging
# =============================================================================


# =============================================================================
# 8. Checkpoints
# =============================================================================


# =============================================================================
# 9. Training loop and entry point
# =============================================================================


def main(argv: list[str] | None = None) -> None:
    cfg = config_from_args(argv)
    print(cfg)


if __name__ == "__main__":
    main()
