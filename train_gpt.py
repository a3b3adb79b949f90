"""GPT speedrun trainer: the whole recipe in one file.

Sections, in data-flow order:
  1. Configuration and presets: settings grouped by owner, label tables, one check of everything
  2. Data: shard format, BOS-aligned and contiguous training loaders, validation, synthetic data, prefetch
  3. Model: attention backends, FP8 head, layers, GPT
  4. Orthogonalisation: Newton-Schulz, Polar Express, Triton kernels
  5. Optimisers: the GroupOptimizer interface, DistAdam, Muon/NorMuon, Snoo, the optimiser set
  6. Schedules: Schedule.at(step) -> batch, windows, lr, momentum and transition events
  7. Logging
  8. Checkpoints
  9. Training loop and entry point

Run a record:  torchrun --standalone --nproc_per_node=8 train_gpt.py
CPU demo:      python train_gpt.py --preset cpu
Importing this file never starts training.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import glob
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================
# 1. Configuration and presets
# =============================================================================
# Settings are grouped by the code that owns them: RunConfig (the run as a whole), DataConfig
# (section 2), ModelConfig (3), OptimizerConfig (5), ScheduleConfig (6) and LoopConfig (9).
# Field names are unique across the groups, so the command line stays flat: `--field value`
# sets the field of whichever group holds it. A field's metadata names its choices or the
# bound it must respect; `build_config` parses every value into its field's type and checks
# everything exactly once, so the code downstream trusts what it is given.
# Defaults are the short-track record (2025-12-21) recipe.


class ConfigError(ValueError):
    """A setting that makes the run impossible; reported as one line before training."""


def setting(default, *, choices=(), check=None, parse=None, show=None, help: str = ""):
    """A config field. choices: the allowed values (or a function returning them, for registries
    defined in later sections); check: (predicate, message); parse(text, current) turns command-line
    text into the field's value (default: by the current value's type); show(value) prints it (default: repr)."""
    metadata = {"choices": choices, "check": check, "parse": parse, "show": show, "help": help}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


POSITIVE = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
AT_LEAST_ONE = (lambda v: v >= 1, "must be >= 1")
FRACTION = (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
NON_EMPTY = (lambda v: len(v) > 0, "expects at least one comma-separated value(s)")
BETAS = (lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v), "expects two betas in [0, 1)")


def exactly(count: int) -> tuple:
    """A check: the tuple holds `count` values."""
    return (lambda v: len(v) == count, f"expects {count} comma-separated value(s)")


def parse_skips(text: str, current=None) -> tuple:
    """'6<3,9<6' -> ((6, 3), (9, 6)): the output of layer 3 joins the input of layer 6."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        to, _, frm = item.partition("<")
        if not (to.strip().isdigit() and frm.strip().isdigit()) or int(frm) >= int(to):
            raise ConfigError(f"--skip-connections {text!r}: each item must be 'to<from' with from < to")
        pairs.append((int(to), int(frm)))
    return tuple(pairs)


def parse_ints(name: str, text: str) -> tuple:
    """'896,2048' -> (896, 2048)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--{name.replace('_', '-')} {text!r}: expects comma-separated integers") from None


def show_skips(pairs) -> str:
    return ",".join(f"{to}<{frm}" for to, frm in pairs)


@dataclass(frozen=True)
class LabelRule:
    """How one parameter label is optimised: which optimiser, and that optimiser's lr and weight
    decay multiplied by `lr` and `wd` (the label's multipliers); `betas` for the Adam kinds.
    Optimisers: adam (DistAdam), scalar_adam (its own DistAdam instance, the one paused after a
    schedule transition), muon (Muon/NorMuon; matrices only)."""
    optimizer: str
    lr: float = 1.0
    wd: float = 1.0
    betas: tuple | None = None


LABEL_OPTIMIZERS = ("adam", "scalar_adam", "muon")
# Every parameter of the model carries one of these labels (section 3); a label table maps each to a rule.
PARAMETER_LABELS = ("lm_head", "untied_embed", "embed", "value_embed", "smear_gate", "skip_gate", "x0_lambdas",
                    "xsa", "bigram_embed", "bigram_lambdas", "resid_lambdas", "post_lambdas", "mudd_w1", "mudd_w2",
                    "mudd_b2", "dc_gate", "scalars", "attn", "attn_gate", "value_embed_gate", "mlp_fc", "mlp_proj")

SHORT_TRACK_LABELS = {
    #               optimiser       lr    wd   Adam betas
    "lm_head":     LabelRule("adam", 1.0, 1.0, (0.65, 0.95)),
    "untied_embed": LabelRule("adam", 1.0, 1.0, (0.65, 0.95)),  # (not in the record: its embedding stays tied)
    "embed":       LabelRule("adam", 1.0, 1.0, (0.65, 0.95)),
    "value_embed": LabelRule("adam", 75.0, 1.0, (0.65, 0.95)),
    "smear_gate":  LabelRule("adam", 0.01, 0.0, (0.65, 0.95)),
    "skip_gate":   LabelRule("adam", 0.01, 0.0, (0.65, 0.95)),  # (not in the record)
    "x0_lambdas":  LabelRule("adam", 5.0, 0.0, (0.65, 0.95)),
    "xsa":         LabelRule("adam", 1.0, 0.0, (0.9, 0.95)),  # (not in the record; short #89's rule)
    "bigram_embed": LabelRule("adam", 75.0, 5.0, (0.75, 0.95)),  # (not in the record; short #89's rule)
    "bigram_lambdas": LabelRule("adam", 1.0, 0.0, (0.9, 0.95)),  # (not in the record; short #89's rule)
    "resid_lambdas": LabelRule("adam", 5.0, 0.0, (0.9, 0.95)),  # (not in the record; short #89's rule)
    "post_lambdas": LabelRule("adam", 1.0, 0.0, (0.9, 0.95)),  # (not in the record; short #89's rule)
    "mudd_w1":     LabelRule("adam", 0.25, 1.0, (0.9, 0.99)),  # (not in the record; short #89's rule)
    "mudd_w2":     LabelRule("adam", 0.25, 1.0, (0.9, 0.99)),  # (not in the record; short #89's rule)
    "mudd_b2":     LabelRule("adam", 0.25, 0.0, (0.9, 0.99)),  # (not in the record; short #89's rule)
    "dc_gate":     LabelRule("adam", 0.1, 1.0, (0.9, 0.99)),  # (not in the record; short #85's gate rule)
    "scalars":     LabelRule("scalar_adam", 5.0, 0.0, (0.9, 0.99)),
    "attn":        LabelRule("muon"),
    "attn_gate":   LabelRule("muon"),
    "value_embed_gate": LabelRule("muon"),  # (not in the record)
    "mlp_fc":      LabelRule("muon"),
    "mlp_proj":    LabelRule("muon", 2.0),
}
MEDIUM_TRACK_LABELS = {  # Adam lr: head 1/320, embeddings 0.3 (= 96x), scalars and x0 lambdas 0.015 (= 4.8x)
    #               optimiser       lr    wd   Adam betas
    "lm_head":     LabelRule("adam", 1.0, 1.0, (0.8, 0.95)),
    "untied_embed": LabelRule("adam", 1.0, 1.0, (0.8, 0.95)),  # (the labels below marked so are not in the record)
    "embed":       LabelRule("adam", 96.0, 1.0, (0.8, 0.95)),
    "value_embed": LabelRule("adam", 96.0, 1.0, (0.8, 0.95)),
    "smear_gate":  LabelRule("adam", 1.0, 1.0, (0.8, 0.95)),  # (not in the record)
    "skip_gate":   LabelRule("adam", 1.0, 1.0, (0.8, 0.95)),  # (not in the record)
    "x0_lambdas":  LabelRule("adam", 4.8, 1.0, (0.8, 0.95)),
    "xsa":         LabelRule("adam", 1.0, 1.0, (0.8, 0.95)),  # (not in the record)
    "bigram_embed": LabelRule("adam", 96.0, 1.0, (0.8, 0.95)),  # (not in the record)
    "bigram_lambdas": LabelRule("adam", 1.0, 1.0, (0.8, 0.95)),  # (not in the record)
    "resid_lambdas": LabelRule("adam", 4.8, 1.0, (0.8, 0.95)),  # (not in the record)
    "post_lambdas": LabelRule("adam", 1.0, 1.0, (0.8, 0.95)),  # (not in the record)
    "mudd_w1":     LabelRule("adam", 0.25, 1.0, (0.8, 0.95)),  # (not in the record)
    "mudd_w2":     LabelRule("adam", 0.25, 1.0, (0.8, 0.95)),  # (not in the record)
    "mudd_b2":     LabelRule("adam", 0.25, 1.0, (0.8, 0.95)),  # (not in the record)
    "dc_gate":     LabelRule("adam", 0.1, 1.0, (0.8, 0.95)),  # (not in the record)
    "scalars":     LabelRule("scalar_adam", 4.8, 1.0, (0.8, 0.95)),
    "attn":        LabelRule("muon"),
    "attn_gate":   LabelRule("muon"),  # (not in the record)
    "value_embed_gate": LabelRule("muon"),  # (not in the record)
    "mlp_fc":      LabelRule("muon", 1.0, 2.0),
    "mlp_proj":    LabelRule("muon", 1.0, 2.0),
}
# Medium record 2025-12-31: the short track's recipe at medium size. Adam lr 0.004 (scalars 0.008 x 5 = 0.04,
# here 10x); decay multipliers 150 (head, untied embedding) and 5 (second embedding, value embeddings).
MEDIUM_2025_12_31_LABELS = {
    #               optimiser       lr    wd    Adam betas
    "lm_head":     LabelRule("adam", 1.0, 150.0, (0.8, 0.95)),
    "untied_embed": LabelRule("adam", 1.0, 150.0, (0.8, 0.95)),
    "embed":       LabelRule("adam", 75.0, 5.0, (0.8, 0.95)),
    "value_embed": LabelRule("adam", 75.0, 5.0, (0.8, 0.95)),
    "smear_gate":  LabelRule("adam", 0.01, 0.0, (0.8, 0.95)),
    "skip_gate":   LabelRule("adam", 0.01, 0.0, (0.8, 0.95)),
    "x0_lambdas":  LabelRule("adam", 5.0, 0.0, (0.8, 0.95)),
    "xsa":         LabelRule("adam", 1.0, 0.0, (0.8, 0.95)),  # (not in the record)
    "bigram_embed": LabelRule("adam", 75.0, 5.0, (0.8, 0.95)),  # (not in the record)
    "bigram_lambdas": LabelRule("adam", 1.0, 0.0, (0.8, 0.95)),  # (not in the record)
    "resid_lambdas": LabelRule("adam", 5.0, 0.0, (0.8, 0.95)),  # (not in the record)
    "post_lambdas": LabelRule("adam", 1.0, 0.0, (0.8, 0.95)),  # (not in the record)
    "mudd_w1":     LabelRule("adam", 0.25, 1.0, (0.9, 0.99)),  # (not in the record)
    "mudd_w2":     LabelRule("adam", 0.25, 1.0, (0.9, 0.99)),  # (not in the record)
    "mudd_b2":     LabelRule("adam", 0.25, 0.0, (0.9, 0.99)),  # (not in the record)
    "dc_gate":     LabelRule("adam", 0.1, 1.0, (0.9, 0.99)),  # (not in the record)
    "scalars":     LabelRule("scalar_adam", 10.0, 0.0, (0.9, 0.99)),
    "attn":        LabelRule("muon"),
    "attn_gate":   LabelRule("muon", 0.1),
    "value_embed_gate": LabelRule("muon", 0.1),
    "mlp_fc":      LabelRule("muon"),
    "mlp_proj":    LabelRule("muon", 2.0),
}
# Short record #89 (2026-07-17): gates, lambdas and scalars in Adam with their own betas; head and embeddings
# decayed 150x and 5x; x0, bigram, post and XSA lambdas at the base lr, residual lambdas and scalars 5x.
SHORT_2026_07_17_LABELS = {
    #               optimiser       lr    wd     Adam betas
    "lm_head":     LabelRule("adam", 1.0, 150.0, (0.5, 0.95)),
    "untied_embed": LabelRule("adam", 1.0, 150.0, (0.5, 0.95)),
    "embed":       LabelRule("adam", 1.0, 150.0, (0.5, 0.95)),  # (not in the record: one input table)
    "value_embed": LabelRule("adam", 75.0, 5.0, (0.75, 0.95)),
    "smear_gate":  LabelRule("adam", 0.01, 0.0, (0.9, 0.99)),
    "skip_gate":   LabelRule("adam", 0.05, 0.0, (0.9, 0.99)),
    "x0_lambdas":  LabelRule("adam", 1.0, 0.0, (0.9, 0.95)),
    "xsa":         LabelRule("adam", 1.0, 0.0, (0.9, 0.95)),
    "bigram_embed": LabelRule("adam", 75.0, 5.0, (0.75, 0.95)),
    "bigram_lambdas": LabelRule("adam", 1.0, 0.0, (0.9, 0.95)),
    "resid_lambdas": LabelRule("adam", 5.0, 0.0, (0.9, 0.95)),
    "post_lambdas": LabelRule("adam", 1.0, 0.0, (0.9, 0.95)),
    "mudd_w1":     LabelRule("adam", 0.25, 1.0, (0.9, 0.99)),
    "mudd_w2":     LabelRule("adam", 0.25, 1.0, (0.9, 0.99)),
    "mudd_b2":     LabelRule("adam", 0.25, 0.0, (0.9, 0.99)),
    "dc_gate":     LabelRule("adam", 0.1, 1.0, (0.9, 0.99)),  # (not in the record: #85's gate rule)
    "scalars":     LabelRule("adam", 5.0, 0.0, (0.9, 0.99)),
    "attn":        LabelRule("muon"),
    "attn_gate":   LabelRule("adam", 1.0, 1.0, (0.9, 0.99)),
    "value_embed_gate": LabelRule("adam", 1.0, 1.0, (0.9, 0.99)),
    "mlp_fc":      LabelRule("muon"),
    "mlp_proj":    LabelRule("muon", 2.0),
}


def parse_label_overrides(text: str, table: dict) -> dict:
    """'value_embed.lr=80,scalars.betas=0.9/0.99,mlp_proj.optimizer=adam' applied to a label table."""
    updated = dict(table)
    for item in filter(None, (part.strip() for part in text.split(","))):
        target, sep, value = item.partition("=")
        label, _, key = target.partition(".")
        if not sep or label not in updated or key not in {f.name for f in fields(LabelRule)}:
            raise ConfigError(f"--labels {text!r}: expected 'label.key=value,...' with a label of "
                              f"{', '.join(PARAMETER_LABELS)} and a key of optimizer, lr, wd, betas; got {item!r}")
        try:
            parsed = (value if key == "optimizer" else tuple(float(b) for b in value.split("/")) if key == "betas"
                      else float(value))
        except ValueError:
            raise ConfigError(f"--labels {text!r}: {item!r} is not a number (betas: b1/b2)") from None
        updated[label] = dataclasses.replace(updated[label], **{key: parsed})
    return updated


@dataclass
class RunConfig:
    preset: str = "short"
    seed: int = 0
    run_id: str = ""  # empty: generated from time and seed
    log_dir: str = "logs"
    target_val_loss: float = 3.28
    device: str = setting("auto", choices=("auto", "cuda", "cpu"))
    compile: bool = True  # torch.compile the model on CUDA
    compile_cpu: bool = False  # also compile on CPU (slow start; checks the compiled path without a GPU)
    compile_backend: str = setting("inductor", choices=("inductor", "aot_eager", "eager"))
    dist_timeout_s: int = setting(300, check=POSITIVE)


@dataclass
class DataConfig:
    data: str = setting("fineweb", choices=("fineweb", "synthetic"), help="synthetic: random tokens, for speed tests")
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    bos_id: int = 50256
    max_seq_len: int = setting(2048, check=POSITIVE)
    repeat_data: bool = False  # start the train shards again when they run out (small samples)
    data_stream: str = setting(
        "bos_aligned", choices=("bos_aligned", "contiguous"),
        help="bos_aligned: every sequence starts at a document start and is cut at max_seq_len or the next "
             "document (short record; cpu, test). contiguous: each slice is the next run of the token stream, "
             "documents cut at slice edges, attention masked per document (medium record)")
    long_documents: str = setting(
        "truncate", choices=("truncate", "continue"),
        help="bos_aligned only. truncate: a document longer than max_seq_len is cut and its rest never "
             "trained on (the short record; default of short and medium). continue: the rest continues in "
             "the next sequences, each part its own attention sequence, so every token is used (default "
             "of cpu and test, and of any run given --train-files without --preset)")
    data_prefetch: bool = setting(True, help="build the next step's batches and index the next shard in "
                                             "background threads; the batches are identical either way")
    # Every step's global batch is cut into this many slices; each rank takes
    # slices/world_size of them as gradient-accumulation micro-steps, so 1, 2, 4 or 8
    # ranks see exactly the same data.
    batch_slices: int = setting(8, check=POSITIVE)
    val_tokens: int = setting(10_485_760, check=POSITIVE)
    # Validation reads val_batch_tokens/batch_slices tokens per forward at every world size
    # (the record's per-GPU chunk on 8 GPUs): documents are cut only at those chunk ends.
    val_batch_tokens: int = setting(4 * 64 * 1024 * 8, check=POSITIVE)


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    vocab_pad_multiple: int = setting(128, check=POSITIVE)
    num_layers: int = setting(11, check=POSITIVE)
    model_dim: int = setting(768, check=POSITIVE)
    num_heads: int = setting(6, check=POSITIVE)
    head_dim: int = setting(128, check=(lambda v: v > 0 and v % 4 == 0, "must be a positive multiple of 4 "
                                                                           "(rotary quarters)"))
    mlp_ratio: int = setting(4, check=POSITIVE)
    window_block: int = setting(128, check=POSITIVE)  # windows are counted in blocks of this many tokens
    # per layer: S short window (long_blocks//2 blocks), L long, N no attention
    window_pattern: str = setting("SSSLSSNSSSL", check=(lambda v: not set(v) - set("SLN"),
                                                        "use S (short), L (long) or N (no attention)"))
    # token: a window of w tokens lets a query see itself and the w tokens before it (short record);
    # block: a query in block b sees the keys of blocks b-n+1..b, n = w/window_block (medium record's block mask)
    window_granularity: str = setting("token", choices=("token", "block"))
    # per layer: value-embedding table added to v, '.' none
    value_embed_pattern: str = setting("12......012", check=(lambda v: not set(v) - set(".0123456789"),
                                                             "use a table index or '.' per layer"))
    tie_embedding: bool = True  # the token embedding is the lm_head matrix
    # > 0: the tied embedding is untied at this fraction of the scheduled steps (the first Adam step from
    # there on): a separate input table starts as a copy of the head, with its Adam state (medium 2025-12-31: 1/6)
    untie_embedding_frac: float = setting(0.0, check=FRACTION, help="untie the tied embedding at this fraction "
                                                                     "of training (0: never; medium_2025_12_31: 1/6)")
    input_embeds: int = setting(1, check=AT_LEAST_ONE)  # input embeddings mixed into every block's residual
    smear_gate: bool = True  # add a gated share of the previous token's embedding
    attn_gate: bool = True  # per-head sigmoid gate on the attention output
    gate_dims: int = setting(12, check=POSITIVE)  # leading residual dims that feed the smear and attention gates
    # v + 2*sigmoid(linear(x[:gate_dims])) * ve per head, instead of v + ve (medium 2025-12-31)
    value_embed_gate: bool = False
    # what the value-embedding gate reads: residual = x[:gate_dims] (medium 2025-12-31); residual_and_value =
    # x[:gate_dims/2] and the value embedding's first gate_dims/2 dims (short #89)
    value_embed_gate_input: str = setting("residual", choices=("residual", "residual_and_value"))
    # skips weighted sigmoid(lambda) * 2*sigmoid(linear(x0[:gate_dims])) per token (medium 2025-12-31); needs skip_gate sigmoid
    skip_token_gate: bool = False
    qkv_init_gain: float = setting(0.5, check=POSITIVE)  # Q, K, V uniform in +-gain*sqrt(3/dim)
    attn_out_zero_init: bool = True  # False: O initialised like Q, K, V (short #89)
    # > 0: Q and K held as matrices of this many heads each (short #89: 2, one 256 x 768 matrix per head pair),
    # so Muon orthogonalises them per head group; V and O stay whole. 0: Q, K, V, O four whole matrices
    qk_group_heads: int = setting(0, check=NON_NEGATIVE, help="Q and K as one matrix per this many heads, for "
                                                               "Muon (short #89: 2; 0: whole)")
    # > 0: a hashed bigram embedding (short #89: 754,560 x 192, zero-init) times a fixed random sign row
    # (bigram_sign_rows rows), added to the first bigram_dim residual dims with a learned per-layer weight
    # (init bigram_lambda_init): into x0 before layer 0, and after each later attention sublayer
    bigram_vocab: int = setting(0, check=NON_NEGATIVE)
    bigram_dim: int = setting(192, check=POSITIVE)
    bigram_sign_rows: int = setting(8192, check=POSITIVE)
    bigram_lambda_init: float = 0.05
    # per layer: X = learnable exclusive self-attention (short #89: layers 1, 3, 4, 7, 8, 10), '.' = none; '' = none
    xsa_pattern: str = setting("", check=(lambda v: not set(v) - set("X."), "use X (XSA) or '.' per layer"),
                               help="per layer X or '.': remove tanh(alpha) of each head's output along the "
                                    "token's own value (learnable XSA, alpha zero-init)")
    key_shift: bool = True  # long-window layers see the previous token's position-free key dims
    # (a, b): MUDD dynamic dense connections (short #89: (7, 3)). Per-token coefficients from a small MLP of
    # the residual (hidden mudd_hidden, GELU, x0.1) replace the last layer's fixed scales: they mix x0, layer
    # a's output and the layer's input into its residual and its values, and weigh its value embedding, its
    # attention, x0, the bigram addend and its MLP. After the last layer a second set adds x0, layers a and b,
    # the last layer's input and value-embedding table 0 (its bias starts as a backout of layer a: -0.5).
    # Needs --residual-form sublayer; () = off
    mudd_sources: tuple = setting((), parse=lambda text, current: parse_ints("mudd_sources", text),
                                  show=lambda v: ",".join(map(str, v)), help="two layers a,b (short #89: 7,3)")
    mudd_hidden: int = setting(64, check=POSITIVE)
    # per layer: D = dynamically composable attention correction (short #85 used it on layer 10; '.' = none, ''
    # = none): after attention, head h adds w2_h * sum_s A(t, s) v_h(s), where A mixes every head's softmax
    # map over the last dc_attention_window tokens with weights w1 = rms_norm over heads of (1 + gate); w1's
    # gate and w2 are linear maps of the attention input's first gate_dims dims, zero-init (no change at the
    # start). #85 drew w1, w2 from its MUDD gate stack instead (not built)
    dc_attention_pattern: str = setting("", check=(lambda v: not set(v) - set("D."), "use D or '.' per layer"),
                                        help="per layer D (dynamically composable attention correction) or '.'")
    dc_attention_window: int = setting(112, check=POSITIVE)
    # per layer: P = paired-head attention (short #89: layers 0, 2, 5, 9), '.' = plain; '' = none. A paired
    # layer attends over a sequence twice as long: token t's heads 2j and 2j+1 become query/key head j at
    # positions 2t and 2t+1; values are the (T, heads) layout read as (2T, heads/2); same window number
    paired_head_pattern: str = setting("", check=(lambda v: not set(v) - set("P."), "use P (paired) or '.' per layer"),
                                       help="per layer P (paired-head attention) or '.' (short #89: P.P..P...P.)")
    # Variant: no smear and no key shift across a document start (the records let both reach the previous document).
    mask_document_starts: bool = False
    fp32_gates: bool = False  # variant: attention and smear gate weights in fp32 (the record holds them in bf16)
    attn_scale: float = 0.1
    rotary_min_freq: float = 1 / 1024
    # which dims rotate together: half = dim i with i + head_dim/2, the rotating frequencies in the first
    # quarter of each half; adjacent = dims 2j and 2j+1, rotating over the first half (short #89)
    rotary_pairs: str = setting("half", choices=("half", "adjacent"))
    yarn: bool = True  # adjust rotary frequencies and attention scale when the window grows
    yarn_alpha: float = 1.0  # frequencies with fewer turns than this in the old window are interpolated
    yarn_beta: float = 32.0  # ... and those with more than this are kept
    yarn_attn_gain: float = 0.2  # attention scale *= 1 + gain * ln(new_window / old_window)
    resid_lambda_init: float = 1.1
    # block: x <- resid*x + sum(x0 lambdas * x0) before each layer, whose sublayers add their outputs (the
    # records up to 2025-12); sublayer (short #89): x <- r_a*x + p_a*attention + x0 mix, then
    # x <- r_m*x + p_m*MLP, r per sublayer (init sqrt(resid_lambda_init)) and p (init 1) learned; a layer
    # without attention gets no attention scale and no x0
    residual_form: str = setting("block", choices=("block", "sublayer"),
                                 help="sublayer: learned residual and output scales per sublayer (short #89)")
    # >= 0: every later attention layer attends over (and gates from) the normed output of this layer
    # instead of its own input (short #89: 7)
    attention_source_layer: int = setting(-1, check=(lambda v: v >= -1, "must be -1 (off) or a layer index"),
                                          help="later layers attend over this layer's normed output (short #89: 7)")
    sa_lambda_init: tuple = setting((0.5, 1.0), check=exactly(2))  # QKV and O scales (value_path normed: v and ve)
    # scaled: QKV and O scaled by sa lambdas, v + ve (short record); normed: v RMS-normed per head,
    # then sa0*v + sa1*ve (sa0*v without a value embedding), no output scale (medium record)
    value_path: str = setting("scaled", choices=("scaled", "normed"))
    value_embed_init_std: float = setting(0.0, check=NON_NEGATIVE)  # 0: zero init (short record); medium: N(0, 1)
    # transposed: MLP output stored (4*dim x dim) like the input matrix (short track); out_in: stored
    # (dim x 4*dim) as the medium record did, so its Muon shape factor is 1
    mlp_proj_layout: str = setting("transposed", choices=("transposed", "out_in"))
    # "to<from": the output of layer `from` joins the input of layer `to`
    skip_connections: tuple = setting(((6, 3),), parse=parse_skips, show=show_skips)
    skip_gate: str = setting("sigmoid", choices=("sigmoid", "linear"))  # weight sigmoid(lambda) | lambda
    skip_init: float = -1.5
    backout_layer: int = 7  # subtract backout_lambda x this layer's output before the head; -1: off
    backout_init: float = 0.5
    # sigmoid: scale*sigmoid((z + offset)/7.5), 30*sigmoid(z/7.5) by default | rational: 15z/sqrt(z^2+225) | none
    softcap: str = setting("sigmoid", choices=("sigmoid", "rational", "none"))
    softcap_scale: float = setting(30.0, check=POSITIVE)  # medium 2025-12-31: 23
    softcap_offset: float = 0.0  # medium 2025-12-31: 5
    head_init_std: float = setting(0.005, check=NON_NEGATIVE)  # 0: zero-init head
    fp8_head: bool = True  # FP8 lm_head matmuls on CUDA in training (bf16 elsewhere)
    # > 0: an auxiliary training loss (short #88: 0.25) on each target's longest proper byte prefix that is
    # itself a GPT-2 token, weighted this much through batch stage 0, fading to 0 through stage 1, then off;
    # the table comes from tiktoken's GPT-2 encoding. Validation is unchanged
    prefix_token_weight: float = setting(0.0, check=NON_NEGATIVE, help="auxiliary loss on each target's longest "
                                                                     "prefix token (short #88: 0.25)")
    # FP8 MLP matmuls in CUDA training (short #89): the up projection with per-tensor scales from the current
    # input and weights (amax/448); the down projection with delayed scales: activations by the previous
    # training forward's amax x 1.80/448 (1 at the start), weights by the previous step's amax x 1.12/448
    # (the current amax/448 over the first 16 steps). The backward is bf16 from the unquantised tensors.
    fp8_mlp: bool = setting(False, help="FP8 MLP with delayed scaling in CUDA training (short #89)")
    fp8_head_in_validation: bool = False  # variant: FP8 for validation logits too (the record: a plain bf16 matmul)
    fp32_train_logits: bool = False  # variant: fp32 training logits (the records round them to bf16 after the softcap)
    fp32_head: bool = False  # lm_head an fp32 parameter cast to bf16 only in the matmul (medium record)
    fp8_scales: tuple = setting((100 / 448, 1.5 / 448, 0.75 / 448), check=exactly(3))  # x, w, logit gradient
    # How the attention and MLP matrices (fp32 parameters) enter a bfloat16 forward. float32: rounded to the
    # nearest bfloat16. split_bfloat16 (short #89, which holds them as bfloat16 plus a 16-bit remainder that
    # together make the fp32 master): the upper 16 bits, i.e. truncated, and the initial weights rounded to
    # bfloat16. Nothing changes when the compute dtype is float32.
    matrix_storage: str = setting("float32", choices=("float32", "split_bfloat16"))
    # auto: varlen on CUDA with token windows, flex on CUDA with block windows, sdpa on CPU
    attention_backend: str = setting("auto", choices=lambda: ("auto", *ATTENTION_BACKENDS))
    # activations, embeddings, head and bf16-held gates. auto: bfloat16 on CUDA (the records), float32 on a CPU,
    # where many processors have no native bf16 and run bf16 matmuls ~70x slower (and results would then
    # depend on which CPU ran them)
    compute_dtype: str = setting("auto", choices=("auto", "bfloat16", "float32"),
                                 help="auto: bfloat16 on CUDA, float32 on a CPU")


@dataclass
class OptimizerConfig:
    # normuon | muon (no variance reduction) | adamw (plain AdamW on everything, the baseline)
    optimizer: str = setting("normuon", choices=("normuon", "muon", "adamw"))
    # Which optimiser each parameter label gets, with its lr/wd multipliers and Adam betas (LabelRule).
    labels: dict = setting(SHORT_TRACK_LABELS, parse=parse_label_overrides,
                           help="overrides of the preset's label table: label.key=value,... "
                                "(keys optimizer, lr, wd, betas as b1/b2), e.g. value_embed.lr=80")
    # cautious: decay wd*lr*eff_lr where update and weight do not have opposite signs (short record);
    # decoupled: p *= 1 - wd*lr everywhere (classic AdamW, medium record)
    wd_style: str = setting("cautious", choices=("cautious", "decoupled"))
    # Adam's cautious decay per step is wd*(lr*m)^2 (m the label's lr multiplier, short record);
    # variant: wd*lr^2*m, the label multiplier not squared (value embeddings decayed 75x less).
    adam_wd_linear_lr_mult: bool = False
    # Adam's cautious decay only where update and weight have the same strict sign (medium 2025-12-31); the
    # short record also decays where the update is exactly zero (an embedding row absent from the batch).
    adam_cautious_strict: bool = False
    adam_lr: float = setting(0.008, check=POSITIVE)
    adam_eps: float = setting(1e-8, check=POSITIVE)
    adam_wd: float = setting(0.005, check=NON_NEGATIVE)
    adam_every: int = setting(2, check=AT_LEAST_ONE)  # Adam groups step every N steps (gradients summed)
    # Adam moments stored in bf16 whatever the parameter (short record), in the parameter's dtype (medium
    # record's torch AdamW: fp32 for the fp32 head, scalars and x0 lambdas), or fp32; update math is fp32.
    adam_moment_dtype: str = setting("bfloat16", choices=("bfloat16", "param", "float32"),
                                     help="param: the parameter's own dtype")
    # True (short record): eps joins sqrt(v) before the bias corrections, which go into the step size:
    # m/(sqrt(v)+eps) * sqrt(1-b2^t)/(1-b1^t). False: textbook m_hat/(sqrt(v_hat)+eps) (torch's AdamW, the
    # medium record). They differ where sqrt(v) is near eps (4x for tiny gradients early on).
    adam_eps_before_correction: bool = True
    # Adam research switches; they apply to every Adam group, the adamw baseline too.
    adam_bias_correction: bool = True
    adam_moment_init: str = setting("zeros", choices=("zeros", "first_grad"))  # first_grad: m0 = g0, v0 = g0^2
    adam_nested_ema: bool = False  # w -= lr * EMA_b1(g / (sqrt(EMA_b2(g^2)) + eps))
    # constant | linear | geometric: adam_eps -> adam_eps_end over num_iterations
    adam_eps_schedule: str = setting("constant", choices=("constant", "linear", "geometric"))
    adam_eps_end: float = setting(1e-8, check=POSITIVE)
    muon_lr: float = setting(0.023, check=POSITIVE)
    muon_wd: float = setting(1.2, check=NON_NEGATIVE)
    # Muon lr (and cautious decay) factor sqrt(max(1, rows/cols)) of: parameter = the parameter as stored,
    # leading dims folded into rows (the short record's fused (4*768 x 768) QKVO: 2); matrix = each
    # orthogonalised matrix (medium record; as a short-track variant it halves the attention step)
    muon_shape_factor: str = setting("parameter", choices=("parameter", "matrix"))
    normuon_beta2: float = setting(0.95, check=FRACTION)
    orthogonalizer: str = setting("polar_express", choices=lambda: tuple(ORTHOGONALIZERS))
    orthogonalizer_steps: int = setting(5, check=AT_LEAST_ONE)
    # auto: bfloat16 on CUDA (the records), float32 on a CPU (see compute_dtype)
    orthogonalize_dtype: str = setting("auto", choices=("auto", "bfloat16", "float32"),
                                       help="auto: bfloat16 on CUDA, float32 on a CPU")
    # Labels whose orthogonalisation rounds B@X and then adds a*X (two roundings, the short record's MLP
    # path); the others use one fused multiply-add (baddbmm).
    orthogonalize_split_update: tuple = setting(("mlp_fc", "mlp_proj"), parse=lambda text, current: tuple(
        filter(None, (part.strip() for part in text.split(",")))), show=",".join,
        help="labels whose Muon update rounds B@X before adding a*X (the short record's MLP); '' for none")
    # EMA update smoothing u <- s*u + (1-s)*O on the Muon update (0: off). With
    # muon_smoothing_steps > 0, s moves linearly from muon_smoothing_start to muon_smoothing.
    muon_smoothing: float = setting(0.0, check=FRACTION)
    muon_smoothing_start: float = setting(0.0, check=FRACTION)
    muon_smoothing_steps: int = setting(0, check=NON_NEGATIVE)
    # The adamw baseline: one lr/betas/wd for every parameter, decoupled wd, every step, textbook eps.
    adamw_lr: float = setting(0.0018, check=POSITIVE)
    adamw_betas: tuple = setting((0.9, 0.95), check=BETAS)
    adamw_wd: float = setting(0.1, check=NON_NEGATIVE)
    # Snoo outer optimiser: after inner steps 1, 1+K, 1+2K, ... pull a slow copy along with Nesterov momentum.
    snoo: bool = False
    snoo_every: int = setting(28, check=AT_LEAST_ONE)
    snoo_lr: float = setting(0.68, check=POSITIVE)
    snoo_momentum: float = setting(0.37, check=FRACTION)


@dataclass
class ScheduleConfig:
    num_iterations: int = setting(1960, check=POSITIVE)  # scheduled steps
    extension_iterations: int = setting(40, check=NON_NEGATIVE)  # extra steps at the final batch/window
    batch_tokens_stages: tuple = setting((131_072, 262_144, 393_216), check=NON_EMPTY)  # one per equal part
    batch_tokens_extension: int = 393_216
    long_window_blocks_stages: tuple = setting((3, 7, 11), check=NON_EMPTY)  # one per stage
    # per batch stage, the longest training sequence (the last entry also in the extension; empty: max_seq_len
    # throughout); short #89: 896, 2048, 2048
    max_seq_len_stages: tuple = setting((), parse=lambda text, current: parse_ints("max_seq_len_stages", text),
                                        help="longest training sequence per batch stage, each <= max_seq_len")
    long_window_blocks_extension: int = 13
    long_window_blocks_final_val: int = 20
    window_schedule: str = setting("stages", choices=("stages", "cubic"))  # cubic: the medium track's growth
    short_window_max_blocks: int = setting(0, check=NON_NEGATIVE)  # cap on the short window (0: none; medium 12-31: 11)
    yarn_max_window_blocks: int = setting(0, check=NON_NEGATIVE)  # YaRN only while the long window <= this (0: always)
    # Multi-token prediction over the first two batch stages (medium 2025-12-31, short #89): targets t+1, t+2,
    # t+3 weighted 1, 0.5, 0.25->0 through stage 0, then t+1, t+2 with 1, 0.5->0 through stage 1, then t+1 alone
    multi_token_prediction: bool = setting(False, help="predict 3, then 2 targets per position over the first two "
                                                       "batch stages, weights fading within each")
    window_cubic_max_tokens: int = 3456
    lr_stage_multipliers: tuple = setting((1.0, 1.51, 1.93), check=NON_EMPTY)
    # after: the lr multiplier of stage k applies once step/num_iterations is strictly past k/stages (short
    # 2025-12-21, medium 2025-12-31); at: from the batch stage's first step on (short #89)
    lr_stage_start: str = setting("after", choices=("after", "at"))
    cooldown_frac: float = 0.55
    lr_min_frac: float = 0.1
    momentum_warmup_steps: int = setting(300, check=NON_NEGATIVE)
    momentum_cooldown_steps: int = setting(50, check=NON_NEGATIVE)
    momentum_min: float = 0.85
    momentum_max: float = 0.95
    scalar_pause_steps: int = setting(40, check=NON_NEGATIVE)  # scalar Adam drops gradients after a transition


@dataclass
class LoopConfig:
    val_every: int = setting(250, check=NON_NEGATIVE)  # 0: validate only at the end
    log_every: int = setting(1, check=NON_NEGATIVE)  # a step line (time, no host sync) every N steps
    train_loss_every: int = setting(10, check=NON_NEGATIVE)  # ... with the train loss (reading it waits for the GPU)
    checkpoint_every: int = setting(0, check=NON_NEGATIVE)  # 0: never
    checkpoint_dir: str = "checkpoints"
    resume: str = ""  # a checkpoint directory written by --checkpoint-every
    warmup_steps: int = setting(10, check=NON_NEGATIVE)  # untimed compile/warm-up steps, state restored afterwards
    # sum: each micro-batch's summed token losses (short record); mean: averaged over the step's tokens, as the
    # medium record's per-rank mean loss averaged over ranks. Only Adam's eps sees the difference (65,536x
    # larger relative to the gradient under mean on the medium track); Muon normalises it away.
    train_loss_reduction: str = setting("sum", choices=("sum", "mean"),
                                        help="sum (short record) or mean over the step's tokens (medium record)")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)


CONFIG_GROUPS = {g.name: g.default_factory for g in fields(Config)}
# field name -> (group name, dataclass field): the flat namespace of the command line and the log.
CONFIG_FIELDS = {f.name: (group, f) for group, cls in CONFIG_GROUPS.items() for f in fields(cls)}

# The CPU presets train on the shipped sample; the 50,304-wide logits dominate a CPU step, so batches are small.
CPU_SAMPLE_DATA = dict(train_files="data/sample/tinyshakespeare_train_*.bin",
                       val_files="data/sample/tinyshakespeare_val_*.bin", repeat_data=True, long_documents="continue",
                       max_seq_len=256, batch_slices=2, val_tokens=16_384, val_batch_tokens=4096)
# Short record #89: the model switches that make its architecture, and its optimiser settings (both presets).
SHORT_2026_07_17_MODEL = dict(
    residual_form="sublayer", attention_source_layer=7, mudd_sources=(7, 3), backout_layer=-1,
    value_embed_pattern=".01.....234", value_embed_init_std=0.01, value_embed_gate=True,
    value_embed_gate_input="residual_and_value", paired_head_pattern="P.P..P...P.", xsa_pattern=".X.XX..XX.X",
    qk_group_heads=2, rotary_pairs="adjacent", attn_out_zero_init=False, skip_token_gate=True,
    bigram_vocab=50_304 * 15, bigram_dim=192, bigram_sign_rows=8192, untie_embedding_frac=2 / 3,
    softcap_scale=23.0, softcap_offset=5.0, fp8_scales=(100 / 448, 1.6 / 448, 0.75 / 448), fp8_mlp=True,
    matrix_storage="split_bfloat16")
SHORT_2026_07_17_OPTIM = dict(labels=SHORT_2026_07_17_LABELS, adam_eps=1e-10, adam_moment_dtype="float32",
                              adam_cautious_strict=True, normuon_beta2=0.9, muon_shape_factor="matrix")
SHORT_2026_07_17_SCHEDULE = dict(lr_stage_multipliers=(1.0, 1.52, 1.73), lr_stage_start="at", cooldown_frac=0.6,
                                 lr_min_frac=0.15,
                                 multi_token_prediction=True, scalar_pause_steps=0)
MEDIUM_2025_12_31_OPTIM = dict(labels=MEDIUM_2025_12_31_LABELS, adam_lr=0.004, adam_cautious_strict=True,
                               muon_lr=0.015)

PRESETS: dict[str, dict] = {
    "short": {},
    "medium": {
        "run": dict(target_val_loss=2.92),
        "data": dict(max_seq_len=65_536, data_stream="contiguous"),
        "model": dict(
            num_layers=16, model_dim=1024, num_heads=8, head_dim=128,
            window_pattern="LSSSLSSNSSSLSSSL", value_embed_pattern="01234......01234", window_granularity="block",
            tie_embedding=False, input_embeds=2, smear_gate=False, attn_gate=False, key_shift=False,
            attn_scale=0.12, yarn=False, resid_lambda_init=1.0, sa_lambda_init=(0.5, 0.5),
            value_path="normed", value_embed_init_std=1.0, mlp_proj_layout="out_in", fp32_head=True,
            skip_connections=((9, 6), (10, 4), (11, 2)), skip_gate="linear", skip_init=1.0, backout_layer=-1,
            softcap="rational", head_init_std=0.0, fp8_head=False),
        "optim": dict(
            optimizer="muon", labels=MEDIUM_TRACK_LABELS, adam_lr=1 / 320, adam_eps=1e-10, adam_wd=0.0,
            adam_moment_dtype="param", adam_eps_before_correction=False, orthogonalize_split_update=(),
            adam_every=1, muon_lr=0.03, muon_wd=0.01, wd_style="decoupled", muon_shape_factor="matrix",
            orthogonalizer="newton_schulz_per_iteration", muon_smoothing=0.2,
            snoo=True, snoo_every=28, snoo_lr=0.68, snoo_momentum=0.37),
        "schedule": dict(
            num_iterations=5590, extension_iterations=0,
            batch_tokens_stages=(524_288,), batch_tokens_extension=524_288,
            window_schedule="cubic", window_cubic_max_tokens=3456, long_window_blocks_final_val=27,
            lr_stage_multipliers=(1.0,), cooldown_frac=0.7, lr_min_frac=0.01,
            momentum_warmup_steps=300, momentum_cooldown_steps=0, scalar_pause_steps=0),
        "loop": dict(val_every=125, train_loss_reduction="mean"),
    },
    # Medium record 2025-12-31 "Bulk transfer short track features" (17.35 min, 4740 steps): the short track's
    # architecture at 16 x 1024 (attention in every layer), gated value embeddings and token-gated skips, an
    # untied input embedding from 1/6 of training, multi-token prediction over the first quarter, twelve
    # batch/window stages. docs/record_facts/medium_2025-12-31.md lists the facts.
    "medium_2025_12_31": {
        "run": dict(target_val_loss=2.92),
        "data": dict(max_seq_len=4096),
        "model": dict(
            num_layers=16, model_dim=1024, num_heads=8, head_dim=128,
            window_pattern="LSSSLSSSSSSLSSSL", value_embed_pattern="01234......01234",
            input_embeds=2, untie_embedding_frac=1 / 6, gate_dims=16, value_embed_gate=True,
            skip_connections=((9, 6), (10, 4), (11, 2)), skip_token_gate=True, backout_layer=11,
            resid_lambda_init=1.05, qkv_init_gain=1.0, softcap_scale=23.0, softcap_offset=5.0, fp8_head=False),
        "optim": MEDIUM_2025_12_31_OPTIM,
        "schedule": dict(
            num_iterations=4700, extension_iterations=40,
            batch_tokens_stages=(131_072, 262_144, 393_216) + (524_288,) * 9, batch_tokens_extension=524_288,
            long_window_blocks_stages=(3, 7, 11, 13, 15, 17, 19, 21, 23, 23, 23, 23),
            long_window_blocks_extension=23, long_window_blocks_final_val=27,
            short_window_max_blocks=11, yarn_max_window_blocks=13,
            lr_stage_multipliers=(1.0, 1.52, 1.73) + (2.0,) * 9, cooldown_frac=0.7, lr_min_frac=0.1,
            multi_token_prediction=True, scalar_pause_steps=0),
    },
    # Short record #89 of 2026-07-17 "MLP down projection in FP8 with efficient delayed scaling metric" (79.7 s
    # measured, 1390 steps): paired-head attention, per-head-pair Q/K, a hashed bigram embedding, five gated
    # value embeddings, per-sublayer residual scales, MUDD, learnable XSA, multi-token prediction, an untied
    # input embedding from 2/3 of training. docs/record_facts/short_89_2026-07-17.md lists the facts.
    "short_2026_07_17": {
        "run": dict(target_val_loss=3.28),
        "model": SHORT_2026_07_17_MODEL,
        "optim": SHORT_2026_07_17_OPTIM,
        "schedule": dict(num_iterations=1380, extension_iterations=10, max_seq_len_stages=(896, 2048, 2048),
                         **SHORT_2026_07_17_SCHEDULE),
    },
    "cpu": {  # a real run on data/sample in a few minutes on a laptop CPU
        "run": dict(target_val_loss=5.9),
        "data": CPU_SAMPLE_DATA,
        "model": dict(num_layers=6, model_dim=128, num_heads=2, head_dim=64, window_block=64,
                      window_pattern="SLSNSL", value_embed_pattern="01..01", skip_connections=((4, 1),),
                      backout_layer=3),
        "optim": dict(adamw_lr=0.005),  # best of 0.002, 0.005, 0.01 for the adamw baseline on this preset
        "schedule": dict(num_iterations=150, extension_iterations=10,
                         batch_tokens_stages=(512, 1024, 1024), batch_tokens_extension=1024,
                         long_window_blocks_stages=(2, 3, 4), long_window_blocks_extension=4,
                         long_window_blocks_final_val=6,
                         momentum_warmup_steps=30, momentum_cooldown_steps=10, scalar_pause_steps=10),
        "loop": dict(val_every=25, warmup_steps=0),
    },
    "short_2026_07_17_cpu": {  # the short_2026_07_17 recipe at the cpu preset's size, on data/sample
        "run": dict(target_val_loss=5.9),
        "data": CPU_SAMPLE_DATA,
        "model": {**SHORT_2026_07_17_MODEL, **dict(
            num_layers=6, model_dim=128, num_heads=2, head_dim=64, window_block=64, window_pattern="SSLNSL",
            value_embed_pattern=".0..12", paired_head_pattern="P...P.", xsa_pattern=".XX..X", skip_connections=((3, 2),),
            attention_source_layer=3, mudd_sources=(3, 2), bigram_vocab=16_384, bigram_dim=32)},
        "optim": SHORT_2026_07_17_OPTIM,
        "schedule": dict(num_iterations=150, extension_iterations=10, max_seq_len_stages=(128, 256, 256),
                         batch_tokens_stages=(512, 1024, 1024), batch_tokens_extension=1024,
                         long_window_blocks_stages=(2, 3, 4), long_window_blocks_extension=4,
                         long_window_blocks_final_val=6, momentum_warmup_steps=30, momentum_cooldown_steps=10,
                         **SHORT_2026_07_17_SCHEDULE),
        "loop": dict(val_every=25, warmup_steps=0),
    },
    "medium_2025_12_31_cpu": {  # the medium_2025_12_31 recipe at the cpu preset's size, on data/sample
        "run": dict(target_val_loss=5.9),
        "data": CPU_SAMPLE_DATA,
        "model": dict(
            num_layers=6, model_dim=128, num_heads=2, head_dim=64, window_block=64,
            window_pattern="LSSLSL", value_embed_pattern="01..01", input_embeds=2, untie_embedding_frac=1 / 6,
            gate_dims=16, value_embed_gate=True, skip_connections=((4, 1), (5, 0)), skip_token_gate=True,
            backout_layer=4, resid_lambda_init=1.05, qkv_init_gain=1.0, softcap_scale=23.0, softcap_offset=5.0,
            fp8_head=False),
        "optim": MEDIUM_2025_12_31_OPTIM,
        "schedule": dict(
            num_iterations=150, extension_iterations=10,
            batch_tokens_stages=(512, 768, 1024) + (1024,) * 9, batch_tokens_extension=1024,
            long_window_blocks_stages=(1, 2, 3) + (4,) * 9, long_window_blocks_extension=4,
            long_window_blocks_final_val=6, short_window_max_blocks=2, yarn_max_window_blocks=3,
            lr_stage_multipliers=(1.0, 1.52, 1.73) + (2.0,) * 9, cooldown_frac=0.7, lr_min_frac=0.1,
            multi_token_prediction=True, momentum_warmup_steps=30, momentum_cooldown_steps=10, scalar_pause_steps=0),
        "loop": dict(val_every=25, warmup_steps=0),
    },
    "test": {  # the smallest model of the same architecture, for the test suite
        "data": dict(train_files="data/sample/tinyshakespeare_train_*.bin",
                     val_files="data/sample/tinyshakespeare_val_*.bin", repeat_data=True, long_documents="continue",
                     max_seq_len=128, batch_slices=2, val_tokens=2048, val_batch_tokens=1024),
        "model": dict(num_layers=4, model_dim=32, num_heads=2, head_dim=16,
                      window_pattern="SLNL", value_embed_pattern="01.1", skip_connections=((3, 1),), backout_layer=2),
        "schedule": dict(num_iterations=12, extension_iterations=2,
                         batch_tokens_stages=(512, 1024, 1024), batch_tokens_extension=1024,
                         long_window_blocks_stages=(1, 1, 2), long_window_blocks_extension=2,
                         long_window_blocks_final_val=3,
                         momentum_warmup_steps=4, momentum_cooldown_steps=2, scalar_pause_steps=2),
        "loop": dict(val_every=5, warmup_steps=0, train_loss_every=1),
    },
}


def config_value(cfg: Config, name: str):
    """A field's value by its flat name."""
    return getattr(getattr(cfg, CONFIG_FIELDS[name][0]), name)


def preset_config(preset: str) -> Config:
    """A preset's settings, not yet checked."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    cfg = Config(**{name: cls(**PRESETS[preset].get(name, {})) for name, cls in CONFIG_GROUPS.items()})
    cfg.run.preset = preset
    return cfg


def with_overrides(cfg: Config, **overrides) -> Config:
    """A copy of cfg with flat-named fields replaced (typed values; not checked)."""
    groups = {name: getattr(cfg, name) for name in CONFIG_GROUPS}
    for name in overrides:
        if name not in CONFIG_FIELDS or name == "preset":
            raise ConfigError(f"unknown config field {name!r}" if name != "preset" else
                              "the preset is chosen by build_config(preset) or --preset, not overridden")
    for group in CONFIG_GROUPS:
        mine = {k: v for k, v in overrides.items() if CONFIG_FIELDS[k][0] == group}
        if mine:
            groups[group] = dataclasses.replace(groups[group], **mine)
    return Config(**groups)


def build_config(preset: str = "short", **overrides) -> Config:
    """The preset with `overrides` (flat field names, typed values) applied, checked once."""
    cfg = with_overrides(preset_config(preset), **overrides)
    check_config(cfg)
    return cfg


def config_from_args(argv: list[str] | None = None) -> Config:
    """Parse `--preset NAME` plus `--field value` overrides into a checked Config."""
    parser = argparse.ArgumentParser(
        description="GPT speedrun trainer. Any config field can be overridden with --field value "
        "(dashes or underscores). Presets: " + ", ".join(PRESETS),
        allow_abbrev=False,
    )
    parser.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)}; default 'short'")
    defaults = Config()
    for group, cls in CONFIG_GROUPS.items():
        section = parser.add_argument_group(f"{group} ({cls.__name__})")
        for f in fields(cls):
            if f.name == "preset":
                continue
            default = getattr(getattr(defaults, group), f.name)
            table = isinstance(default, dict)  # the label table: too long to print, and set by the preset
            shown = "the preset's table" if table else (f.metadata.get("show") or repr)(default)
            extra = f.metadata.get("help", "")
            choices = f.metadata.get("choices") or ()
            choices = choices() if callable(choices) else choices
            if choices:
                extra = f"one of {', '.join(map(str, choices))}" + (f"; {extra}" if extra else "")
            flags = dict.fromkeys(["--" + f.name.replace("_", "-"), "--" + f.name])
            section.add_argument(*flags, dest=f.name, default=None,
                                 metavar="LABEL.KEY=VALUE,..." if table else type(default).__name__.upper(),
                                 help=f"default {shown}" + (f"; {extra}" if extra else ""))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}; valid options are --preset and --<field> for fields: "
                          + ", ".join(name for name in CONFIG_FIELDS if name != "preset"))
    texts = {k: v for k, v in vars(args).items() if v is not None and k != "preset"}
    base = preset_config(args.preset or "short")
    overrides = {name: parse_flag(name, text, config_value(base, name)) for name, text in texts.items()}
    if "train_files" in texts and args.preset is None and "long_documents" not in texts:
        # The user's own files: use every token. A record run on FineWeb elsewhere names its preset.
        overrides["long_documents"] = "continue"
    return build_config(base.run.preset, **overrides)


def parse_flag(name: str, text: str, current):
    """Command-line text -> the field's value (its own parser, else by the type of its value)."""
    parse = CONFIG_FIELDS[name][1].metadata.get("parse")
    if parse is not None:
        return parse(text, current)
    try:
        if isinstance(current, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(current, tuple):
            return tuple(type(current[0])(x) if current else float(x) for x in text.split(",") if x)
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        return text
    except ValueError:
        raise ConfigError(f"--{name.replace('_', '-')} expects {type(current).__name__}, got {text!r}") from None


def flat_config(cfg: Config) -> dict:
    """Every field by its flat name, as plain JSON values (the log's `config:` line)."""
    return {name: value for group in CONFIG_GROUPS for name, value in dataclasses.asdict(getattr(cfg, group)).items()}


def layer_marked(pattern: str, layer: int, mark: str) -> bool:
    """Whether an optional per-layer pattern ('' = none) marks this layer."""
    return bool(pattern) and pattern[layer] == mark


def check_config(cfg: Config) -> None:
    """Every check that does not depend on the world size, once, as a one-line ConfigError."""
    def fail(name: str, message: str):
        value = config_value(cfg, name)
        shown = (CONFIG_FIELDS[name][1].metadata.get("show") or repr)(value)
        raise ConfigError(f"--{name.replace('_', '-')} {shown}: {message}")

    for name, (_, f) in CONFIG_FIELDS.items():
        value = config_value(cfg, name)
        choices = f.metadata.get("choices") or ()
        choices = choices() if callable(choices) else choices
        if choices and value not in choices:
            fail(name, "choose one of " + ", ".join(choices))
        check = f.metadata.get("check")
        if check is not None and not check[0](value):
            fail(name, check[1])
    data, model, optim, sched = cfg.data, cfg.model, cfg.optim, cfg.schedule

    for tokens in (*sched.batch_tokens_stages, sched.batch_tokens_extension):
        if tokens <= 0 or tokens % data.batch_slices:
            raise ConfigError(f"batch of {tokens} tokens is not divisible into --batch-slices {data.batch_slices}")
    if any(not 0 < n <= data.max_seq_len for n in sched.max_seq_len_stages):
        fail("max_seq_len_stages", f"each must be in 1..--max-seq-len {data.max_seq_len}")
    if data.val_tokens % data.val_batch_tokens or data.val_batch_tokens % data.batch_slices:
        raise ConfigError(f"--val-tokens {data.val_tokens} must be a multiple of --val-batch-tokens "
                          f"{data.val_batch_tokens}, itself a multiple of --batch-slices {data.batch_slices} "
                          "(one validation chunk per forward)")

    layers = model.num_layers
    for name in ("window_pattern", "value_embed_pattern"):
        if len(getattr(model, name)) != layers:
            fail(name, f"needs one character per layer ({layers} layers)")
    tables = sorted({int(c) for c in model.value_embed_pattern if c != "."})
    if tables != list(range(len(tables))):
        fail("value_embed_pattern", "tables must be numbered 0..n-1")
    if any(to >= layers for to, _ in model.skip_connections):
        fail("skip_connections", f"only {layers} layers")
    if model.backout_layer >= layers:
        fail("backout_layer", f"only {layers} layers")
    if model.attention_source_layer >= layers - 1:
        fail("attention_source_layer", f"needs a later layer to use it (layers 0..{layers - 1})")
    if model.qk_group_heads and model.num_heads % model.qk_group_heads:
        fail("qk_group_heads", f"must divide --num-heads {model.num_heads}")
    if model.gate_dims > model.model_dim:
        fail("gate_dims", f"exceeds --model-dim {model.model_dim}")
    if model.bigram_vocab > 0 and model.bigram_dim > model.model_dim:
        fail("bigram_dim", f"exceeds --model-dim {model.model_dim}")
    if model.bigram_vocab == 1:
        fail("bigram_vocab", "needs at least 2 rows (the last is reserved for a sequence's first token)")
    for name in ("xsa_pattern", "paired_head_pattern", "dc_attention_pattern"):  # optional per-layer patterns
        if getattr(model, name) and len(getattr(model, name)) != layers:
            fail(name, f"needs one character per layer ({layers} layers), or '' for none")
    if any(x == "X" and w == "N" for x, w in zip(model.xsa_pattern, model.window_pattern)):
        fail("xsa_pattern", "XSA on a layer without attention (N in --window-pattern)")
    if model.mudd_sources:
        if len(model.mudd_sources) != 2 or not all(0 <= n < layers - 1 for n in model.mudd_sources):
            fail("mudd_sources", f"needs two layers a,b before the last ({layers} layers)")
        if model.residual_form != "sublayer" or model.value_path != "scaled":
            fail("mudd_sources", "needs --residual-form sublayer and --value-path scaled")
        if model.window_pattern[-1] == "N" or not model.value_embed_pattern.strip("."):
            fail("mudd_sources", "needs attention in the last layer and a value-embedding table")
        if model.backout_layer >= 0 or any(to == layers - 1 for to, _ in model.skip_connections):
            fail("mudd_sources", "replaces the backout and takes the last layer's input as it is: --backout-layer -1 "
                                 "and no skip connection into the last layer")
    if "P" in model.paired_head_pattern and model.num_heads % 2:
        fail("paired_head_pattern", f"pairs heads: --num-heads {model.num_heads} is odd")
    for layer, window in enumerate(model.window_pattern):
        paired = layer_marked(model.paired_head_pattern, layer, "P")
        if layer_marked(model.dc_attention_pattern, layer, "D") and (window == "N" or paired):
            fail("dc_attention_pattern", f"layer {layer}: needs plain (not paired) attention")
        if paired and (window == "N" or layer_marked(model.xsa_pattern, layer, "X") or (window == "L" and model.key_shift)):
            fail("paired_head_pattern", f"layer {layer}: a paired layer needs attention, without XSA or "
                                        "the key shift (a short window, or --key-shift false)")
    if model.untie_embedding_frac > 0 and not model.tie_embedding:
        fail("untie_embedding_frac", "needs a tied embedding (--tie-embedding true)")
    if model.untie_embedding_frac > 0 and {optim.labels[k].optimizer for k in ("lm_head", "untied_embed")} != {"adam"}:
        fail("untie_embedding_frac", "the untied embedding takes the head's Adam state: --labels lm_head and "
                                     "untied_embed must both use adam")
    if model.prefix_token_weight > 0 and model.vocab_size != 50257:
        fail("prefix_token_weight", f"the prefix table is GPT-2's: needs --vocab-size 50257, not {model.vocab_size}")
    if model.fp8_mlp and model.mlp_proj_layout != "transposed":
        fail("fp8_mlp", "needs --mlp-proj-layout transposed")
    if model.value_embed_gate and model.value_path != "scaled":
        fail("value_embed_gate", "gates v + ve on the scaled value path (--value-path scaled)")
    on_cpu = resolve_device_type(cfg.run.device) == "cpu"
    if model.attention_backend == "varlen" and on_cpu:
        fail("attention_backend", "varlen needs a CUDA device; use sdpa or flex on CPU")
    if model.attention_backend == "varlen" and model.window_granularity == "block":
        fail("attention_backend", "varlen has token windows only; use flex with --window-granularity block")
    if model.attention_backend == "flex" and on_cpu:
        fail("attention_backend", FLEX_ON_CPU)

    unknown = set(optim.orthogonalize_split_update) - set(PARAMETER_LABELS)
    if unknown:
        fail("orthogonalize_split_update", f"unknown label(s) {', '.join(sorted(unknown))}; labels are "
                                           + ", ".join(PARAMETER_LABELS))
    if set(optim.labels) != set(PARAMETER_LABELS):
        raise ConfigError(f"--labels: the table must hold exactly the labels {', '.join(PARAMETER_LABELS)}")
    for label, rule in optim.labels.items():
        if rule.optimizer not in LABEL_OPTIMIZERS:
            raise ConfigError(f"--labels {label}.optimizer={rule.optimizer}: choose one of "
                              + ", ".join(LABEL_OPTIMIZERS))
        if not (math.isfinite(rule.lr) and math.isfinite(rule.wd) and rule.lr >= 0 and rule.wd >= 0):
            raise ConfigError(f"--labels {label}: the lr and wd multipliers must be finite and >= 0")
        if rule.optimizer != "muon" and not (rule.betas is not None and BETAS[0](rule.betas)):
            raise ConfigError(f"--labels {label}.betas: an Adam label needs two betas in [0, 1), as b1/b2")


def check_world_size(cfg: Config, world_size: int) -> None:
    if cfg.data.batch_slices % world_size:
        raise ConfigError(f"--batch-slices {cfg.data.batch_slices} is not divisible by the world size {world_size} "
                          "(each rank takes batch_slices/world_size accumulation micro-steps)")


# =============================================================================
# 2. Data
# =============================================================================
# Shard file: 256 little-endian int32 header words [magic, version, num_tokens,
# 0...] followed by num_tokens uint16 tokens. The loaders take checked settings
# (check_config): batch_slices divides by the world size and every batch by batch_slices.

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
                        f"`python data/cached_fineweb10B.py`, or point --{what}-files at your shards)")
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

    def to(self, device) -> MicroBatch:
        inputs, targets, cu = (t.to(device, non_blocking=True) for t in (self.inputs, self.targets, self.cu_seqlens))
        return MicroBatch(inputs, targets, cu, self.max_seqlen)

    def pin_memory(self) -> MicroBatch:
        """Page-locked host copies, so the copy to the GPU can overlap compute."""
        inputs, targets, cu = (t.pin_memory() for t in (self.inputs, self.targets, self.cu_seqlens))
        return MicroBatch(inputs, targets, cu, self.max_seqlen)


def pack_sequences(pieces: list[np.ndarray], device) -> MicroBatch:
    """Concatenate sequences (each starting at BOS) into a shifted input/target pair."""
    buf = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
    lengths = [len(p) for p in pieces]
    lengths[-1] -= 1  # the final token is only a target
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    cu = torch.from_numpy(starts)
    return MicroBatch(buf[:-1].to(device, non_blocking=True), buf[1:].to(device, non_blocking=True),
                      cu.to(device, non_blocking=True), int(max(lengths)))


def index_shard(path: str, bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A shard's tokens (memory-mapped) and the positions of its document starts."""
    tokens = load_shard(path)
    return tokens, np.flatnonzero(np.asarray(tokens) == bos_id)


class ShardIndex:
    """Train shards with their document starts, optionally indexed one shard ahead.

    Finding the BOS positions of a 100M-token shard reads the whole 200 MB file (seconds from disk);
    with `ahead` a background thread indexes the next shard while the current one
    trains. The result is the same either way: only when it is computed differs.
    """

    def __init__(self, files: list[str], bos_id: int, *, ahead: bool = False, wrap: bool = False):
        self.files, self.bos_id, self.wrap = files, bos_id, wrap
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-index") if ahead else None
        self._entries: dict[int, Future] = {}

    def get(self, shard_index: int) -> tuple[np.ndarray, np.ndarray]:
        entry = self._entries.get(shard_index)
        if entry is None:
            entry = Future()
            entry.set_result(index_shard(self.files[shard_index], self.bos_id))
        keep = {shard_index: entry}
        following = shard_index + 1 if shard_index + 1 < len(self.files) else (0 if self.wrap else None)
        if self._executor is not None and following not in (None, shard_index):
            keep[following] = (self._entries.get(following)
                               or self._executor.submit(index_shard, self.files[following], self.bos_id))
        for i, stale in self._entries.items():
            if i not in keep:
                stale.cancel()
        self._entries = keep
        return entry.result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._entries = {}


def following_shard(shard_index: int, num_files: int, repeat: bool) -> int:
    """The train shard after shard_index: the first again (a new epoch) with repeat, an error without."""
    if shard_index + 1 < num_files:
        return shard_index + 1
    if not repeat:
        raise DataError(f"training data exhausted: all {num_files} train shard(s) were used "
                        "(download more shards, train for fewer steps, or set --repeat-data true)")
    return 0


class DocumentStream:
    """Walks the train shards document by document, in order, across shard ends.

    long_documents="truncate" (the records): each sequence is one document cut to its
    length limit, and the rest of the document is dropped. "continue": the rest of a
    document longer than the limit becomes the next sequence(s), so every token is used
    once per epoch; each continuation is its own attention sequence.
    Every rank runs an identical stream so all agree on where each slice starts;
    only the slices a rank owns are materialised as tensors.
    """

    def __init__(self, files: list[str], bos_id: int, repeat: bool = False, long_documents: str = "truncate",
                 index_ahead: bool = False):
        self.files, self.bos_id, self.repeat = files, bos_id, repeat
        self.continue_documents = long_documents == "continue"
        self.index = ShardIndex(files, bos_id, ahead=index_ahead, wrap=repeat)
        self.shard_index, self.doc_index, self.doc_offset, self.epoch = 0, 0, 0, 0
        self._open(0)
        self.first_shard = (len(self.tokens), self.doc_starts)  # for the start-of-run description

    def _open(self, shard_index: int) -> None:
        self.tokens, self.doc_starts = self.index.get(shard_index)
        self.shard_index = shard_index

    def state(self) -> dict:
        return {"shard_index": self.shard_index, "doc_index": self.doc_index, "doc_offset": self.doc_offset,
                "epoch": self.epoch}

    def load_state(self, state: dict) -> None:
        self._open(state["shard_index"])
        self.doc_index, self.doc_offset, self.epoch = state["doc_index"], state.get("doc_offset", 0), state["epoch"]

    def next_sequence(self, max_len: int) -> np.ndarray:
        """The next document (or, under "continue", its next part) of at most max_len tokens."""
        shards_opened = 0
        while self.doc_index >= len(self.doc_starts):
            next_shard = following_shard(self.shard_index, len(self.files), self.repeat)
            self.epoch += 1 if next_shard == 0 else 0
            shards_opened += 1
            if shards_opened > len(self.files):
                raise DataError(f"no document start (token {self.bos_id}) in any train shard: {self.files}")
            self._open(next_shard)
            self.doc_index, self.doc_offset = 0, 0
        start = int(self.doc_starts[self.doc_index]) + self.doc_offset
        end = int(self.doc_starts[self.doc_index + 1]) if self.doc_index + 1 < len(self.doc_starts) else len(self.tokens)
        length = min(end - start, max_len)
        if self.continue_documents and length < end - start:
            self.doc_offset += length
        else:
            self.doc_index, self.doc_offset = self.doc_index + 1, 0
        return self.tokens[start:start + length]

    def next_slice(self, num_tokens: int, max_seq_len: int) -> list[np.ndarray]:
        """Sequences totalling exactly num_tokens + 1 tokens (one extra for the shifted targets)."""
        pieces, need = [], num_tokens + 1
        while need > 0:
            piece = self.next_sequence(min(max_seq_len, need))
            pieces.append(piece)
            need -= len(piece)
        return pieces


def describe_training_data(files: list[str], first_shard: tuple[int, np.ndarray], *,
                           max_seq_len: int, data_stream: str, long_documents: str,
                           warn_unseen_share: float = 0.2) -> list[str]:
    """Start-of-run lines about the training data; a warning line when truncation hides much of it.

    Document statistics come from the first shard only (the one the loader has already
    indexed): scanning every FineWeb shard would cost seconds per shard before the run starts.
    """
    total = sum(read_shard_header(path) for path in files)
    num_tokens, doc_starts = first_shard
    bounds = np.append(doc_starts, num_tokens)
    lengths = np.diff(bounds)
    where = "its" if len(files) == 1 else "the first shard's"
    line = f"train data: {len(files)} shard(s), {total:,} tokens; {where} {len(lengths):,} documents"
    if len(lengths):
        line += f" (median {int(np.median(lengths)):,}, max {int(lengths.max()):,} tokens)"
    unseen = 0.0
    if data_stream == "contiguous":
        line += "; data_stream=contiguous: documents are cut at slice edges; every token is used but each shard's last partial step"
    elif long_documents == "continue":
        line += f"; long_documents=continue: documents longer than max_seq_len={max_seq_len} continue in the next sequences"
    else:
        past_limit = int(np.maximum(lengths - max_seq_len, 0).sum())
        unseen = past_limit / max(int(lengths.sum()), 1)
        line += (f"; long_documents=truncate: {100 * unseen:.1f}% of {where} tokens lie past max_seq_len={max_seq_len} "
                 "in their document and are never trained on")
    lines = [line]
    if unseen > warn_unseen_share:
        lines.append(f"warning: {100 * unseen:.0f}% of the training tokens are never seen because documents are "
                     f"longer than max_seq_len={max_seq_len}; use --long-documents continue (or tokenise with "
                     "data/tokenize_text.py --split-paragraphs)")
    return lines


class TrainLoader:
    """Distributed, BOS-aligned training batches.

    A step of `batch_tokens` global tokens is cut into `slices` consecutive slices of
    batch_tokens/slices tokens. Rank r takes slices r, r+W, r+2W, ...: one per
    gradient-accumulation micro-step. The batch size may change from step to step.
    """

    def __init__(self, pattern: str, rank: int, world_size: int, *, slices: int, max_seq_len: int,
                 bos_id: int, repeat: bool = False, long_documents: str = "truncate", index_ahead: bool = False,
                 device="cpu"):
        self.stream = DocumentStream(list_shards(pattern, "train"), bos_id, repeat, long_documents, index_ahead)
        self.rank, self.world_size, self.slices = rank, world_size, slices
        self.max_seq_len, self.long_documents, self.device = max_seq_len, long_documents, device

    def next_step(self, batch_tokens: int, max_seq_len: int | None = None) -> list[MicroBatch]:
        """max_seq_len: this step's limit (a schedule's stage), at most the loader's."""
        slice_tokens = batch_tokens // self.slices
        micro = []
        for i in range(self.slices):
            pieces = self.stream.next_slice(slice_tokens, max_seq_len or self.max_seq_len)
            if i % self.world_size == self.rank:
                micro.append(pack_sequences(pieces, self.device))
        return micro

    def describe(self) -> list[str]:
        return describe_training_data(self.stream.files, self.stream.first_shard, max_seq_len=self.max_seq_len,
                                      data_stream="bos_aligned", long_documents=self.long_documents)

    def state_dict(self) -> dict:
        return self.stream.state()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state(state)

    def close(self) -> None:
        self.stream.index.close()


def split_at_documents(chunk: np.ndarray, bos_id: int, max_len: int) -> list[np.ndarray]:
    """Cut a run of tokens (inputs plus one final target) before every BOS after its first token,
    and inside a document every max_len inputs, so no sequence is longer than max_len."""
    starts = np.concatenate([[0], np.flatnonzero(chunk[1:-1] == bos_id) + 1])
    ends = np.append(starts[1:], len(chunk) - 1)
    bounds = np.concatenate([np.arange(a, b, max_len) for a, b in zip(starts, ends)] + [[len(chunk)]])
    return [chunk[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class ContiguousLoader:
    """The 2025-09-30 medium record's stream: contiguous slices of the token stream.

    Each step reads the next batch_tokens tokens of the current shard as one window;
    slice i is window tokens [i*L, (i+1)*L] (L = batch_tokens/slices; its last token is
    only a target and is the next slice's first input). Rank r takes slices r, r+W, ...
    Documents are cut at slice edges; cu_seqlens split each slice before every BOS so
    attention stays inside documents, and every max_seq_len tokens inside a document
    (never in the medium record, whose slices are max_seq_len long). A step that would reach the end of a shard starts
    at the next shard instead, skipping the shard's tail, as the record did.
    """

    def __init__(self, pattern: str, rank: int, world_size: int, *, slices: int, max_seq_len: int, bos_id: int,
                 repeat: bool = False, index_ahead: bool = False, device="cpu"):
        self.files = list_shards(pattern, "train")
        self.index = ShardIndex(self.files, bos_id, ahead=index_ahead, wrap=repeat)
        self.rank, self.world_size, self.slices = rank, world_size, slices
        self.max_seq_len, self.bos_id, self.repeat, self.device = max_seq_len, bos_id, repeat, device
        self.shard_index, self.pos, self.epoch = 0, 0, 0
        self.tokens, self.doc_starts = self.index.get(0)
        self.first_shard = (len(self.tokens), self.doc_starts)  # for the start-of-run description

    def _next_window(self, batch_tokens: int) -> int:
        """Position of this step's window in self.tokens, moving to the next shard when needed."""
        shards_tried = 0
        while self.pos + batch_tokens + 1 >= len(self.tokens):
            next_shard = following_shard(self.shard_index, len(self.files), self.repeat)
            self.epoch += 1 if next_shard == 0 else 0
            shards_tried += 1
            if shards_tried > len(self.files):
                raise DataError(f"no train shard holds more than batch_tokens+1 = {batch_tokens + 1} tokens "
                                f"(needed by --data-stream contiguous): {self.files}")
            self.tokens, self.doc_starts = self.index.get(next_shard)
            self.shard_index, self.pos = next_shard, 0
        start = self.pos
        self.pos += batch_tokens
        return start

    def next_step(self, batch_tokens: int, max_seq_len: int | None = None) -> list[MicroBatch]:
        slice_tokens = batch_tokens // self.slices
        window = self._next_window(batch_tokens)
        limit = max_seq_len or self.max_seq_len
        micro = []
        for i in range(self.rank, self.slices, self.world_size):
            chunk = self.tokens[window + i * slice_tokens:window + (i + 1) * slice_tokens + 1]
            micro.append(pack_sequences(split_at_documents(np.asarray(chunk), self.bos_id, limit), self.device))
        return micro

    def describe(self) -> list[str]:
        return describe_training_data(self.files, self.first_shard, max_seq_len=0,
                                      data_stream="contiguous", long_documents="")

    def state_dict(self) -> dict:
        return {"shard_index": self.shard_index, "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.tokens, self.doc_starts = self.index.get(state["shard_index"])
        self.shard_index, self.pos, self.epoch = state["shard_index"], state["pos"], state["epoch"]

    def close(self) -> None:
        self.index.close()


class SyntheticLoader:
    """Random tokens in BOS-separated documents, generated on the fly (for speed tests)."""

    def __init__(self, rank: int, world_size: int, *, slices: int, max_seq_len: int, bos_id: int,
                 vocab_size: int, seed: int = 0, device="cpu"):
        self.rank, self.world_size, self.slices = rank, world_size, slices
        self.max_seq_len, self.bos_id, self.vocab_size = max_seq_len, bos_id, vocab_size
        self.device, self.seed, self.step = device, seed, 0

    def next_step(self, batch_tokens: int, max_seq_len: int | None = None) -> list[MicroBatch]:
        slice_tokens = batch_tokens // self.slices
        limit = max_seq_len or self.max_seq_len
        micro = []
        for i in range(self.rank, self.slices, self.world_size):
            rng = np.random.default_rng([self.seed, self.step, i])
            tokens = rng.integers(0, self.bos_id, size=slice_tokens + 1, dtype=np.int64)
            pieces, pos = [], 0
            while pos < len(tokens):
                length = int(min(rng.integers(50, 2000), limit, len(tokens) - pos))
                piece = tokens[pos:pos + length].copy()
                piece[0] = self.bos_id
                pieces.append(piece)
                pos += length
            micro.append(pack_sequences(pieces, self.device))
        self.step += 1
        return micro

    def describe(self) -> list[str]:
        return ["train data: synthetic random tokens in BOS-separated documents of 50-2000 tokens"]

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]

    def close(self) -> None:
        pass


class PrefetchingLoader:
    """Builds the next step's micro-batches in a background thread while this step trains.

    The batches are exactly the wrapped loader's, in the same order. The next step is
    guessed to have this step's batch size and sequence limit; when the guess is wrong (a stage
    change) or the state is restored (warm-up, resume), the wrapped loader is rewound
    to where the guess started and the batch is built synchronously. state_dict() is the
    position after the batches handed out, not after the one being prepared, so
    checkpoints are the same as without prefetching.
    """

    def __init__(self, loader, device):
        self.loader, self.device = loader, torch.device(device)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch")
        self._pending: tuple[tuple, dict, Future] | None = None  # (guessed arguments, state before, build)

    def _build(self, batch_tokens: int, max_seq_len: int | None) -> list[MicroBatch]:
        micro = self.loader.next_step(batch_tokens, max_seq_len)
        return [mb.pin_memory() for mb in micro] if self.device.type == "cuda" else micro

    def _drop_pending(self) -> None:
        """Wait for the build in flight (its result or error is discarded) and rewind to before it."""
        if self._pending is not None:
            _, state, future = self._pending
            self._pending = None
            future.exception()
            self.loader.load_state_dict(state)

    def next_step(self, batch_tokens: int, max_seq_len: int | None = None) -> list[MicroBatch]:
        arguments = (batch_tokens, max_seq_len)
        if self._pending is not None and self._pending[0] == arguments:
            future = self._pending[2]
            self._pending = None
            micro = future.result()  # raises what the synchronous call would have raised
        else:
            self._drop_pending()
            micro = self._build(*arguments)
        state = copy.deepcopy(self.loader.state_dict())
        self._pending = (arguments, state, self._executor.submit(self._build, *arguments))
        return [mb.to(self.device) for mb in micro]

    def describe(self) -> list[str]:
        return self.loader.describe()

    def state_dict(self) -> dict:
        return copy.deepcopy(self._pending[1] if self._pending is not None else self.loader.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self._drop_pending()
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self._drop_pending()
        self._executor.shutdown(wait=True)
        self.loader.close()


def validation_batches(pattern: str, rank: int, world_size: int, *, val_tokens: int, chunk_tokens: int,
                       bos_id: int, device="cpu"):
    """Yield this rank's chunks of the first val_tokens validation tokens, read sequentially.

    The tokens are cut into consecutive chunks of chunk_tokens (+1 target), one per forward;
    rank r takes chunks r, r+W, r+2W, ..., so the chunks, and the loss, do not depend on the
    world size. Chunks are not BOS-aligned; cu_seqlens still splits at every BOS so attention
    stays inside documents. val_tokens is a multiple of chunk_tokens (check_config).
    """
    tokens = np.concatenate([np.asarray(load_shard(p)) for p in list_shards(pattern, "val")])
    if len(tokens) < val_tokens + 1:
        raise DataError(f"validation files {pattern!r} hold {len(tokens)} tokens; need val_tokens+1 = {val_tokens + 1}")
    for index in range(rank, val_tokens // chunk_tokens, world_size):
        chunk = tokens[index * chunk_tokens:(index + 1) * chunk_tokens + 1]
        cuts = np.flatnonzero(chunk[1:-1] == bos_id) + 1  # document starts inside the chunk
        bounds = np.concatenate([[0], cuts, [len(chunk)]])
        yield pack_sequences([chunk[a:b] for a, b in zip(bounds[:-1], bounds[1:])], device)


# =============================================================================
# 3. Model
# =============================================================================
# Layouts are chosen for the optimisers: every matrix a Muon optimiser sees is
# stored so its last two dims are the matrix to orthogonalise, and every
# parameter carries a `label` that routes it to its optimiser group (section 5).


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def resolve_dtype(name: str, device) -> torch.dtype:
    """A dtype setting ("auto", "bfloat16", "float32") on this device: auto is bfloat16 on CUDA, float32 on a CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


def matrix_in(w: torch.Tensor, dtype: torch.dtype, truncate: bool) -> torch.Tensor:
    """An fp32 weight matrix in the compute dtype: rounded, or (truncate, for bfloat16) its upper 16 bits,
    with the gradient passed straight through to the fp32 weight."""
    if truncate and dtype == torch.bfloat16 and w.dtype == torch.float32:
        with torch.no_grad():
            low_bits = w - (w.view(torch.int32) & -65536).view(torch.float32)  # exact in fp32
        w = w - low_bits
    return w.to(dtype)


def labelled(tensor: torch.Tensor, label: str) -> nn.Parameter:
    param = nn.Parameter(tensor)
    param.label = label
    return param


# --- sequence bookkeeping ------------------------------------------------------


@dataclass
class Segments:
    """Where the packed sequences of a micro-batch start, in the forms the layers need."""
    cu_seqlens: torch.Tensor  # (num_seqs + 1,) int32
    max_seqlen: int
    is_start: torch.Tensor  # (T,) bool: first token of a sequence
    seq_id: torch.Tensor  # (T,) int: which sequence a token belongs to
    position: torch.Tensor  # (T,) int: index of a token inside its own sequence


def make_segments(cu_seqlens: torch.Tensor, max_seqlen: int, num_tokens: int) -> Segments:
    marks = torch.zeros(num_tokens + 1, dtype=torch.int32, device=cu_seqlens.device)
    marks[cu_seqlens.long()] = 1  # a trailing num_tokens entry lands in the extra slot
    is_start = marks[:num_tokens].bool()
    seq_id = torch.cumsum(marks[:num_tokens], 0) - 1
    position = torch.arange(num_tokens, device=cu_seqlens.device) - cu_seqlens.long()[seq_id]
    return Segments(cu_seqlens.int(), max_seqlen, is_start, seq_id, position)


def shift_to_next_position(x: torch.Tensor, segments: Segments, mask_document_starts: bool,
                           first: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = x[t-1]; out[0] = `first` (zeros if None). As in the records, a document's first token
    gets the previous document's last one, unless mask_document_starts zeroes every sequence start."""
    shifted = torch.cat([torch.zeros_like(x[:1]) if first is None else first, x[:-1]])
    if not mask_document_starts:
        return shifted
    keep = (~segments.is_start).view(-1, *([1] * (x.ndim - 1)))
    return shifted * keep


# --- attention backends -------------------------------------------------------
# All compute the same function: causal attention inside each sequence within a
# window of `window` tokens. q, k, v: (T, heads, head_dim). block = 0: the query
# sees itself and the `window` tokens before it (window + 1 keys, FlashAttention's
# window_size=(window, 0) as the short record calls it); block > 0: a query in
# block b (of `block` tokens, counted from the start of the micro-batch) sees the
# blocks b-n+1..b, n = window // block (the medium record's flex block mask, which
# always keeps the query's own block: n = 0 acts as 1).
# Which keys a query sees is decided in ONE place, `attention_mask_allows` (with
# `keys_before`): the SDPA mask and the flex mask_mod evaluate it, and varlen's
# window_size is `keys_before`. A backend's mask depends only on the micro-batch and
# the window, so the model builds it once per forward and window (`ATTENTION_MASKS`)
# and every layer using that window shares it.


def keys_before(window: int) -> int:
    """How many earlier keys of its own sequence a query sees with a token window (block = 0)."""
    return window


def attention_mask_allows(q_pos, k_pos, q_seq, k_seq, window: int, block: int = 0):
    if block > 0:
        near = q_pos // block - k_pos // block < max(window // block, 1)
    else:
        near = q_pos - k_pos <= keys_before(window)
    return (q_seq == k_seq) & (q_pos >= k_pos) & near


def sdpa_mask(segments: Segments, window: int, block: int = 0) -> torch.Tensor:
    """Dense (T, T) boolean mask."""
    pos, seq = torch.arange(segments.seq_id.numel(), device=segments.seq_id.device), segments.seq_id
    return attention_mask_allows(pos[:, None], pos[None, :], seq[:, None], seq[None, :], window, block)


def attention_sdpa(q, k, v, segments: Segments, window: int, scale: float, block: int = 0,
                   mask=None) -> torch.Tensor:
    """Explicit (T, T) mask; the portable path (CPU, any device)."""
    mask = sdpa_mask(segments, window, block) if mask is None else mask
    y = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                       attn_mask=mask, scale=scale)
    return y.transpose(0, 1)


_compiled_flex = {}  # eager mode: flex_attention compiled once per process


def flex_block_mask(segments: Segments, window: int, block: int = 0):
    """Flex attention's block-sparse mask. Outside a compiled model it is built by a compiled
    function on CUDA, which evaluates the mask block by block instead of as a dense T x T tensor."""
    from torch.nn.attention.flex_attention import create_block_mask
    T = segments.seq_id.numel()
    # segments.seq_id again, from searchsorted: Inductor's CPU flex kernel accepts only a
    # materialised buffer in mask_mod, and the fused cumsum that makes seq_id is not one.
    positions = torch.arange(T, device=segments.cu_seqlens.device, dtype=segments.cu_seqlens.dtype)
    seq = torch.searchsorted(segments.cu_seqlens[1:], positions, right=True)

    def mask_mod(batch, head, q_idx, k_idx):
        return attention_mask_allows(q_idx, k_idx, seq[q_idx], seq[k_idx], window, block)

    compile_it = seq.is_cuda and not torch.compiler.is_compiling()
    return create_block_mask(mask_mod, None, None, T, T, device=seq.device, _compile=compile_it)


def attention_flex(q, k, v, segments: Segments, window: int, scale: float, block: int = 0,
                   mask=None) -> torch.Tensor:
    """torch's flex attention. torch has no flex backward on CPU (eager or compiled): on CPU it
    serves evaluation and tests only; train with sdpa there."""
    from torch.nn.attention.flex_attention import flex_attention
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(f"--attention-backend {FLEX_ON_CPU}")
    block_mask = flex_block_mask(segments, window, block) if mask is None else mask
    attend = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():  # eager flex on CUDA would materialise T x T scores
        if "flex_attention" not in _compiled_flex:
            _compiled_flex["flex_attention"] = torch.compile(flex_attention)
        attend = _compiled_flex["flex_attention"]
    # (1, heads, T, head_dim) made contiguous: Inductor's CPU flex kernel rejects the strided view.
    q, k, v = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v))
    return attend(q, k, v, block_mask=block_mask, scale=scale)[0].transpose(0, 1)


def attention_varlen(q, k, v, segments: Segments, window: int, scale: float, block: int = 0,
                     mask=None) -> torch.Tensor:
    """torch's varlen (FlashAttention-2-style) kernel over the cumulative sequence lengths; CUDA only,
    token windows only (resolve_attention_backend refuses block windows)."""
    from torch.nn.attention.varlen import varlen_attn
    cu, max_len = segments.cu_seqlens, segments.max_seqlen
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(keys_before(window), 0))


ATTENTION_BACKENDS = {"sdpa": attention_sdpa, "flex": attention_flex, "varlen": attention_varlen}
ATTENTION_MASKS = {"sdpa": sdpa_mask, "flex": flex_block_mask, "varlen": lambda segments, window, block=0: None}
FLEX_ON_CPU = ("flex cannot train on CPU: torch's flex attention has no CPU backward (eager or compiled); "
               "use --attention-backend sdpa on CPU")


def resolve_attention_backend(name: str, device, granularity: str = "token") -> str:
    """The backend "auto" stands for on this device (check_config refused the impossible choices)."""
    if name != "auto":
        return name
    return ("varlen" if granularity == "token" else "flex") if torch.device(device).type == "cuda" else "sdpa"


# --- FP8 lm_head ----------------------------------------------------------------
# logits = x @ w^T with x and w cast to e4m3 and the logit gradient to e5m2, each
# with a fixed scale (no amax bookkeeping, so no host syncs). Wrapped as custom ops
# so torch.compile treats them as opaque and autograd uses our backward. Inside each
# op the casts and scaled matmuls are ONE compiled region (`fp8_region`): the (T x vocab)
# logit gradient is read once in bf16 and written once in e5m2, with no fp32 temporaries.
# The forward accumulates fast (use_fast_accum), as the record does; the backward does not.


def fp8_supported(x: torch.Tensor) -> bool:
    """Whether the FP8 head runs for this input: on CUDA, with a row count _scaled_mm accepts."""
    return x.is_cuda and x.size(0) % 16 == 0


def to_fp8(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    limit = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-limit, limit).to(dtype)


def scaled_mm(a8, b8, scale_a: float, scale_b: float, out_dtype, fast_accum: bool = False) -> torch.Tensor:
    """a8 @ b8 where b8 is given row-major as (k, n) and is passed column-major as _scaled_mm wants."""
    one = torch.ones((), device=a8.device, dtype=torch.float32)
    return torch._scaled_mm(a8, b8.T.contiguous().T, scale_a=one * scale_a, scale_b=one * scale_b,
                            out_dtype=out_dtype, use_fast_accum=fast_accum)


def fp8_forward_math(x, w, x_scale: float, w_scale: float):
    x8 = to_fp8(x, x_scale, torch.float8_e4m3fn)
    w8 = to_fp8(w, w_scale, torch.float8_e4m3fn)
    return scaled_mm(x8, w8.T, x_scale, w_scale, torch.bfloat16, fast_accum=True), x8, w8


def fp8_backward_math(grad, x8, w8, x_scale: float, w_scale: float, grad_scale: float):
    g8 = to_fp8(grad, grad_scale, torch.float8_e5m2)
    grad_x = scaled_mm(g8, w8, grad_scale, w_scale, torch.bfloat16)
    grad_w = scaled_mm(g8.T.contiguous(), x8, grad_scale, x_scale, torch.float32)
    return grad_x, grad_w


_fp8_compiled = {}


def fp8_region(name: str, math_fn):
    """`math_fn` compiled on CUDA (the casts fuse into single passes); plain eager on CPU, where
    the same math runs unfused (torch._scaled_mm has a CPU kernel) for the tests."""
    def run(*args):
        if not args[0].is_cuda:
            return math_fn(*args)
        if name not in _fp8_compiled:
            _fp8_compiled[name] = torch.compile(math_fn, dynamic=False)
        return _fp8_compiled[name](*args)
    return run


fp8_forward_region = fp8_region("forward", fp8_forward_math)
fp8_backward_region = fp8_region("backward", fp8_backward_math)


@torch.library.custom_op("speedrun::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, w: torch.Tensor, x_scale: float, w_scale: float,
               grad_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return fp8_forward_region(x, w, x_scale, w_scale)


@fp8_linear.register_fake
def _(x, w, x_scale, w_scale, grad_scale):
    return (x.new_empty(x.size(0), w.size(0), dtype=torch.bfloat16),
            torch.empty_like(x, dtype=torch.float8_e4m3fn), torch.empty_like(w, dtype=torch.float8_e4m3fn))


@torch.library.custom_op("speedrun::fp8_linear_backward", mutates_args=())
def fp8_linear_backward(grad: torch.Tensor, x8: torch.Tensor, w8: torch.Tensor, x_scale: float, w_scale: float,
                        grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return fp8_backward_region(grad, x8, w8, x_scale, w_scale, grad_scale)


@fp8_linear_backward.register_fake
def _(grad, x8, w8, x_scale, w_scale, grad_scale):
    return grad.new_empty(grad.size(0), w8.size(1), dtype=torch.bfloat16), w8.new_empty(w8.shape, dtype=torch.float32)


def _fp8_setup_context(ctx, inputs, output):
    x, w, x_scale, w_scale, grad_scale = inputs
    ctx.save_for_backward(output[1], output[2])
    ctx.scales = (x_scale, w_scale, grad_scale)
    ctx.dtypes = (x.dtype, w.dtype)


def _fp8_backward(ctx, grad_out, grad_x8, grad_w8):
    x8, w8 = ctx.saved_tensors
    grad_x, grad_w = fp8_linear_backward(grad_out, x8, w8, *ctx.scales)
    return grad_x.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None, None, None


fp8_linear.register_autograd(_fp8_backward, setup_context=_fp8_setup_context)

FP8_MAX = 448.0  # largest e4m3 value
FP8_MLP_ACTIVATION_HEADROOM = 1.80  # delayed scales leave room for growth since the amax they came from
FP8_MLP_WEIGHT_HEADROOM = 1.12
FP8_MLP_BOOTSTRAP_STEPS = 16  # optimiser steps whose down-projection weight scale is the current amax/448


def fp8_mlp_math(x, fc, proj, activation_scale, proj_scale):
    """relu(x fc^T)^2 proj with FP8 matmuls: x and fc quantised by their own amax/448 (fp32 accumulation),
    the hidden activation and proj by the given (delayed) scales (fast accumulation). Returns the output
    and what the backward and the next scales need: pre-activation, activation, the activation's amax."""
    x_scale = x.abs().amax().float().clamp_min(1e-12) / FP8_MAX
    fc_scale = fc.abs().amax().float().clamp_min(1e-12) / FP8_MAX
    x8 = (x.float() / x_scale).to(torch.float8_e4m3fn)
    fc8 = (fc.float() / fc_scale).to(torch.float8_e4m3fn)
    pre = torch._scaled_mm(x8, fc8.T, scale_a=x_scale, scale_b=fc_scale, out_dtype=torch.bfloat16)
    post = F.relu(pre).square()
    post8 = (post.float() / activation_scale).clamp_max(FP8_MAX).to(torch.float8_e4m3fn)
    proj8 = (proj.float() / proj_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(post8, proj8.T.contiguous().T, scale_a=activation_scale, scale_b=proj_scale,
                           out_dtype=torch.bfloat16, use_fast_accum=True)
    return out, pre, post, post.abs().amax().float()


fp8_mlp_region = fp8_region("mlp", fp8_mlp_math)


@torch.library.custom_op("speedrun::fp8_mlp", mutates_args=())
def fp8_mlp(x: torch.Tensor, fc: torch.Tensor, proj: torch.Tensor, activation_scale: torch.Tensor,
            proj_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return fp8_mlp_region(x, fc, proj, activation_scale, proj_scale)


@fp8_mlp.register_fake
def _(x, fc, proj, activation_scale, proj_scale):
    hidden = x.new_empty(x.size(0), fc.size(0), dtype=torch.bfloat16)
    return (x.new_empty(x.size(0), proj.size(1), dtype=torch.bfloat16), hidden, torch.empty_like(hidden),
            x.new_empty((), dtype=torch.float32))


def _fp8_mlp_setup_context(ctx, inputs, output):
    x, fc, proj, _, _ = inputs
    ctx.save_for_backward(x, fc, proj, output[1], output[2])


def _fp8_mlp_backward(ctx, grad_out, grad_pre, grad_post, grad_amax):
    """The bf16 MLP's gradient at the FP8 forward's activations (straight through the quantisation)."""
    x, fc, proj, pre, post = ctx.saved_tensors
    grad_out = grad_out.to(post.dtype)
    grad_pre = 2 * (grad_out @ proj.T.to(grad_out.dtype)) * F.relu(pre)
    grad_x = grad_pre @ fc.to(grad_pre.dtype)
    return (grad_x.to(x.dtype), (grad_pre.T @ x.to(grad_pre.dtype)).to(fc.dtype),
            (post.T @ grad_out).to(proj.dtype), None, None)


fp8_mlp.register_autograd(_fp8_mlp_backward, setup_context=_fp8_mlp_setup_context)


# --- layers ---------------------------------------------------------------------


class Rotary(nn.Module):
    """Rotary embedding over head_dim/2 dim pairs: dim i with i + head_dim/2 (pairs "half"), or dims
    2j and 2j+1 (pairs "adjacent").

    Only the first half of the frequencies rotate; the rest are zero, leaving
    those pairs position-free. When the attention window grows, YaRN slows the
    frequencies that complete few turns inside the old window (interpolation) and
    leaves the fast ones alone, and sharpens the attention scale a little.
    """

    def __init__(self, head_dim: int, min_freq: float, pairs: str = "half"):
        super().__init__()
        quarter = head_dim // 4
        freq = torch.cat([min_freq ** torch.linspace(0, 1, quarter), torch.zeros(head_dim // 2 - quarter)])
        self.register_buffer("freq", freq)  # persistent: YaRN changes it during training
        self.adjacent = pairs == "adjacent"

    def position_free_dims(self) -> torch.Tensor:
        still = self.freq == 0
        return still.repeat_interleave(2) if self.adjacent else torch.cat([still, still])

    def forward(self, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of every token's angles, shaped (T, 1, head_dim/2) to broadcast over heads."""
        # Positions count from each sequence's start and the angles are formed in float64, so
        # a token's rotation does not depend on where its sequence sits in the packed batch
        # (fp32 absolute positions lose ~0.01 rad at 262k tokens).
        angle = (position.double()[:, None] * self.freq.double()).float()
        return angle.cos()[:, None, :], angle.sin()[:, None, :]

    @torch.no_grad()
    def yarn_rescale(self, old_window: int, new_window: int, alpha: float, beta: float) -> None:
        turns = old_window * self.freq / (2 * math.pi)
        keep = ((turns - alpha) / (beta - alpha)).clamp(0, 1)
        ratio = old_window / new_window
        self.freq.mul_(ratio + keep * (1 - ratio))


def rotate(x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor], adjacent: bool = False) -> torch.Tensor:
    """Apply rotary angles (Rotary.forward) to x: (T, heads, head_dim); each pair (a, b) becomes
    (a cos + b sin, b cos - a sin)."""
    cos, sin = angles
    if adjacent:
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).flatten(-2).type_as(x)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


@dataclass
class LayerInputs:
    """What every layer of one forward shares, computed once per forward."""
    segments: Segments
    angles: tuple  # rotary (cos, sin)
    adjacent_pairs: bool  # rotary pairs dims 2j, 2j+1 (else i, i + head_dim/2)
    position_free: torch.Tensor  # (head_dim,) bool: the dims rotary leaves alone
    attn_scale: torch.Tensor
    backend: str  # a key of ATTENTION_BACKENDS
    windows: dict  # window kind ("S", "L") -> window in tokens
    masks: dict  # window in tokens -> the backend's mask, shared by every layer using that window
    value_embeds: list  # each value-embedding table looked up once: a table serves several layers
    paired: "LayerInputs | None" = None  # the doubled sequence of paired-head layers (its own segments, angles, masks)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window_kind: str, shift_keys: bool, dtype: torch.dtype,
                 has_value_embed: bool = False, xsa: bool = False, paired: bool = False, dc: bool = False):
        super().__init__()
        self.paired = paired
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        inner, dim = cfg.num_heads * cfg.head_dim, cfg.model_dim
        # Q, K, V and O (O stored transposed) as one (4, inner, dim) tensor: four
        # same-shaped matrices the optimiser orthogonalises as a batch.
        qkvo = torch.empty(4, inner, dim)
        bound = math.sqrt(3) * cfg.qkv_init_gain / math.sqrt(dim)
        nn.init.uniform_(qkvo[:3], -bound, bound)
        if cfg.attn_out_zero_init:
            nn.init.zeros_(qkvo[3])
        else:
            nn.init.uniform_(qkvo[3], -bound, bound)
        # NorMuon normalises per output unit of the records' (out x in) matrices: rows of Q, K, V,
        # columns of the O stored here transposed; Q and K in head groups (wide) per input column (short #89).
        self.qk_grouped = cfg.qk_group_heads > 0
        if self.qk_grouped:  # the same initial values, held as (2 * heads / n, n * head_dim, dim) and (V, O)
            self.qk = labelled(qkvo[:2].reshape(-1, cfg.qk_group_heads * cfg.head_dim, dim).clone(), "attn")
            self.vo = labelled(qkvo[2:].clone(), "attn")
            self.vo.normalise_columns = (False, True)
        else:
            self.qkvo = labelled(qkvo, "attn")
            self.qkvo.normalise_columns = (False, False, False, True)
        self.gate_dims = cfg.gate_dims
        gate_dtype = torch.float32 if cfg.fp32_gates else dtype
        self.output_gate = self.value_gate = None
        if cfg.attn_gate:
            self.output_gate = labelled(torch.zeros(cfg.num_heads, cfg.gate_dims, dtype=gate_dtype), "attn_gate")
            self.output_gate.normalise_columns = (False,)  # per head (row), although the matrix is wide
        if cfg.value_embed_gate and has_value_embed:  # zero-init: a factor 2*sigmoid(0) = 1 at the start
            self.value_gate = labelled(torch.zeros(cfg.num_heads, cfg.gate_dims, dtype=gate_dtype), "value_embed_gate")
            self.value_gate.normalise_columns = (False,)
        self.xsa_alpha = labelled(torch.zeros(cfg.num_heads), "xsa") if xsa else None  # per head, fp32
        self.dc_gate, self.dc_window = None, cfg.dc_attention_window
        if dc:  # rows: the heads' w1 gates, then their w2 weights
            self.dc_gate = labelled(torch.zeros(2 * cfg.num_heads, cfg.gate_dims, dtype=gate_dtype), "dc_gate")
        self.window_kind, self.shift_keys = window_kind, shift_keys
        self.window_block = cfg.window_block if cfg.window_granularity == "block" else 0
        self.mask_document_starts = cfg.mask_document_starts
        self.normed_values = cfg.value_path == "normed"
        self.value_gate_reads_value = cfg.value_embed_gate_input == "residual_and_value"
        self.truncate = cfg.matrix_storage == "split_bfloat16"

    def forward(self, x, value_embed, ctx: LayerInputs, qkv_scale, out_scale, value_addend=None) -> torch.Tensor:
        """qkv_scale, out_scale: the layer's sa lambdas; on the normed value path they weigh v and ve.
        value_addend (T, inner): added to v instead of the (gated) value embedding (MUDD's last layer)."""
        T = x.size(0)
        w_qkv, w_out = self.weights(x.dtype)
        qkv = F.linear(x, w_qkv)
        q, k, v = (qkv if self.normed_values else qkv_scale * qkv).view(T, 3, self.heads, self.head_dim).unbind(1)
        q, k = rms_norm(q), rms_norm(k)
        attend = ctx
        if self.paired:  # heads 2j, 2j+1 of token t -> head j at positions 2t, 2t+1 of the doubled sequence
            attend = ctx.paired
            q, k = (t.view(T, self.heads // 2, 2, self.head_dim).transpose(1, 2).reshape(2 * T, self.heads // 2, -1)
                    for t in (q, k))
        # The scale is a tensor (YaRN changes it), so it is folded into q rather than passed as a float.
        q = rotate(q, attend.angles, ctx.adjacent_pairs) * ctx.attn_scale
        k = rotate(k, attend.angles, ctx.adjacent_pairs)
        if self.shift_keys:  # a head can match on the previous token's content through these dims
            shifted = shift_to_next_position(k, ctx.segments, self.mask_document_starts, first=k[:1])
            k = torch.where(ctx.position_free, shifted, k)
        if value_addend is not None:
            v = v + value_addend.view_as(v)
        elif self.normed_values:
            v = qkv_scale * rms_norm(v)
            if value_embed is not None:
                v = v + out_scale * value_embed.view_as(v)
        elif value_embed is not None:
            if self.value_gate is not None:
                if self.value_gate_reads_value:
                    half = self.gate_dims // 2
                    gate_input = torch.cat([x[:, :half], value_embed[:, :self.gate_dims - half].type_as(x)], dim=-1)
                else:
                    gate_input = x[:, :self.gate_dims]
                gate = 2 * torch.sigmoid(F.linear(gate_input, self.value_gate.type_as(x)))
                v = v + gate[..., None] * value_embed.view_as(v)
            else:
                v = v + value_embed.view_as(v)
        window = ctx.windows[self.window_kind]
        if self.paired:  # values: (T, heads) read as (2T, heads/2); the output read back the same way
            y = ATTENTION_BACKENDS[ctx.backend](q, k, v.reshape(2 * T, self.heads // 2, -1), attend.segments, window,
                                                1.0, self.window_block, attend.masks[window]).reshape_as(v)
        else:
            y = ATTENTION_BACKENDS[ctx.backend](q, k, v, ctx.segments, window, 1.0, self.window_block, ctx.masks[window])
        if self.dc_gate is not None:
            gates = F.linear(x[:, :self.gate_dims], self.dc_gate.type_as(x)).float()
            mix = F.rms_norm(1 + gates[:, :self.heads], (self.heads,), eps=1e-6)
            y = y + dc_attention_correction(q, k, v, ctx.segments, mix, gates[:, self.heads:], self.dc_window).type_as(y)
        if self.xsa_alpha is not None:
            y = exclude_own_value(y, v, self.xsa_alpha)
        if self.output_gate is not None:
            y = y * torch.sigmoid(F.linear(x[:, :self.gate_dims], self.output_gate.type_as(x)))[..., None]
        y = y.reshape(T, -1) @ w_out
        return y if self.normed_values else out_scale * y

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(QKV stacked (3 * inner, dim), O (inner, dim)) in `dtype`, however they are held."""
        if self.qk_grouped:
            vo = matrix_in(self.vo, dtype, self.truncate)
            return torch.cat([matrix_in(self.qk, dtype, self.truncate).flatten(0, 1), vo[0]]), vo[1]
        w = matrix_in(self.qkvo, dtype, self.truncate)
        return w[:3].flatten(0, 1), w[3]


def dc_attention_correction(q, k, v, segments: Segments, mix: torch.Tensor, weight: torch.Tensor, window: int,
                            block: int = 128) -> torch.Tensor:
    """Dynamically composable attention (short #85's post-composition): with P_h(t, s) each head's softmax of
    q_h(t) . k_h(s) over the keys 0 <= t - s < window of t's own sequence, A(t, s) = sum_h mix_h(t) P_h(t, s)
    and the correction of head h is weight_h(t) sum_s A(t, s) v_h(s). q (already scaled), k, v: (T, heads, dim);
    mix, weight: (T, heads). Banded: each block of `block` queries sees its block + window - 1 keys."""
    T, heads, dim = q.shape
    blocks = -(-T // block)
    span = block + window - 1
    key_index = (torch.arange(blocks, device=q.device)[:, None] * block - (window - 1)
                 + torch.arange(span, device=q.device))  # (blocks, span)
    query_index = torch.arange(blocks * block, device=q.device).view(blocks, block)
    safe_key = key_index.clamp(0, T - 1)
    pad = blocks * block - T
    q_blocks = F.pad(q.float(), (0, 0, 0, 0, 0, pad)).view(blocks, block, heads, dim)
    scores = torch.einsum("bqhd,bkhd->bhqk", q_blocks, k.float()[safe_key])
    seq_id = F.pad(segments.seq_id, (0, pad), value=-1)
    back = query_index[:, :, None] - key_index[:, None, :]
    allowed = ((back >= 0) & (back < window) & (key_index[:, None, :] >= 0)
               & (seq_id[query_index][:, :, None] == segments.seq_id[safe_key][:, None, :]))
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num()
    composed = torch.einsum("bhqk,bqh->bqk", probs, F.pad(mix, (0, 0, 0, pad)).view(blocks, block, heads))
    mixed = torch.einsum("bqk,bkhd->bqhd", composed, v.float()[safe_key]).reshape(blocks * block, heads, dim)[:T]
    return weight[..., None] * mixed


def exclude_own_value(y: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Learnable exclusive self-attention: y_h - tanh(alpha_h) (y_h . u_h) u_h, u_h the token's own value of
    head h normalised (norm floored at 1e-4). y, v: (T, heads, head_dim); alpha: (heads,). alpha = 0: y."""
    unit = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-4)
    along = (y * unit).sum(-1, keepdim=True)
    return y - torch.tanh(alpha).type_as(y)[:, None] * along * unit


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden, dim = cfg.mlp_ratio * cfg.model_dim, cfg.model_dim
        bound = math.sqrt(3) * 0.5 / math.sqrt(dim)
        self.fc = labelled(torch.empty(hidden, dim).uniform_(-bound, bound), "mlp_fc")
        # transposed: same shape as fc (one Muon batch); out_in: (dim x hidden) like nn.Linear
        self.proj_transposed = cfg.mlp_proj_layout == "transposed"
        self.proj = labelled(torch.zeros((hidden, dim) if self.proj_transposed else (dim, hidden)), "mlp_proj")
        self.truncate = cfg.matrix_storage == "split_bfloat16"
        self.fp8 = cfg.fp8_mlp
        if self.fp8:  # the delayed FP8 scales (section 3 above), persistent: checkpoints and the warm-up keep them
            self.register_buffer("fp8_activation_scale", torch.ones(()))
            self.register_buffer("fp8_proj_scale", torch.zeros(()))
            self.register_buffer("fp8_proj_next_scale", torch.zeros(()))
            self.refresh_fp8_proj_scale(0)  # the initial weights' scale, as after a bootstrap step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc, proj = (matrix_in(w, x.dtype, self.truncate) for w in (self.fc, self.proj))
        if self.fp8 and torch.is_grad_enabled() and fp8_supported(x):
            out, _, _, amax = fp8_mlp(x, fc, proj, self.fp8_activation_scale, self.fp8_proj_scale)
            with torch.no_grad():  # the next training forward's activation scale
                self.fp8_activation_scale.copy_(amax.clamp_min(1e-12) * (FP8_MLP_ACTIVATION_HEADROOM / FP8_MAX))
            return out
        h = F.relu(F.linear(x, fc)).square()
        return h @ proj if self.proj_transposed else F.linear(h, proj)

    @torch.no_grad()
    def refresh_fp8_proj_scale(self, step: int) -> None:
        """After optimiser step `step`: the down projection is quantised with the scale measured after the
        previous step (the current amax/448 over the first steps), then the next scale is measured."""
        amax = matrix_in(self.proj, torch.bfloat16, self.truncate).abs().amax().float().clamp_min(1e-12)
        if step < FP8_MLP_BOOTSTRAP_STEPS:
            self.fp8_proj_next_scale.copy_(amax / FP8_MAX)
        self.fp8_proj_scale.copy_(self.fp8_proj_next_scale)
        self.fp8_proj_next_scale.copy_(amax * (FP8_MLP_WEIGHT_HEADROOM / FP8_MAX))


class Block(nn.Module):
    """Layer `layer`: attention with its window kind and value embedding (unless the pattern says N), then the MLP."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype):
        super().__init__()
        kind, table = cfg.window_pattern[layer], cfg.value_embed_pattern[layer]
        self.value_embed_index = None if table == "." else int(table)
        marks = (layer_marked(cfg.xsa_pattern, layer, "X"), layer_marked(cfg.paired_head_pattern, layer, "P"),
                 layer_marked(cfg.dc_attention_pattern, layer, "D"))
        self.attn = (Attention(cfg, kind, cfg.key_shift and kind == "L", dtype, self.value_embed_index is not None,
                               *marks) if kind != "N" else None)
        self.mlp = MLP(cfg)

    def forward(self, x, ctx: LayerInputs, qkv_scale, out_scale, after_attention=None, attention_input=None,
                sublayer_mix=None) -> torch.Tensor:
        """after_attention: added to the leading dims of the residual after the attention sublayer.
        attention_input: what attention reads instead of rms_norm(x). sublayer_mix (residual_form
        sublayer): (resid (2,), post (2,), x0 mix); None: each sublayer's output is simply added."""
        resid, post, x0_mix = sublayer_mix if sublayer_mix is not None else (None, None, None)
        if self.attn is not None:
            value_embed = None if self.value_embed_index is None else ctx.value_embeds[self.value_embed_index]
            attended = self.attn(rms_norm(x) if attention_input is None else attention_input, value_embed, ctx,
                                 qkv_scale, out_scale)
            x = x + attended if sublayer_mix is None else resid[0] * x + post[0] * attended + x0_mix
            if after_attention is not None:
                x = add_to_leading_dims(x, after_attention)
        if sublayer_mix is None:
            return x + self.mlp(rms_norm(x))
        return resid[1] * x + post[1] * self.mlp(rms_norm(x))


def add_to_leading_dims(x: torch.Tensor, addend: torch.Tensor) -> torch.Tensor:
    """x with `addend` (T, d) added to its first d dims."""
    d = addend.size(-1)
    return torch.cat([x[:, :d] + addend, x[:, d:]], dim=-1)


BIGRAM_HASH_MULTIPLIERS = (36313, 27191)  # short #89: h = (36313 x_t XOR 27191 x_{t-1}) mod (rows - 1)


def bigram_rows(tokens: torch.Tensor, rows: int, sign_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position: the bigram table row of (previous token, token), and the row of the sign table.
    The first token of a micro-batch has no previous token: the last (reserved) row and sign row 0. The
    previous token may end another document, as in the record."""
    current, previous = tokens[1:].long(), tokens[:-1].long()
    a, b = BIGRAM_HASH_MULTIPLIERS
    hashed = torch.bitwise_xor(a * current, b * previous) % (rows - 1)
    signs = torch.bitwise_xor(previous, current) % sign_rows
    first = tokens.new_full((1,), rows - 1, dtype=torch.long)
    return torch.cat([first, hashed]), torch.cat([first * 0, signs])


def softcap(logits: torch.Tensor, kind: str, scale: float = 30.0, offset: float = 0.0) -> torch.Tensor:
    if kind == "sigmoid":  # 30·sigmoid(z/7.5) = 15·tanh(z/15) + 15; medium 2025-12-31: 23·sigmoid((z+5)/7.5)
        return scale * torch.sigmoid((logits + offset if offset else logits) * (1 / 7.5))
    if kind == "rational":
        return 15 * logits * torch.rsqrt(logits.square() + 225)
    return logits


class GPT(nn.Module):
    """Both tracks' models; every feature is a ModelConfig field (section 1).

    Short track: tied head/embedding, smear gate, 3 value embeddings, gated attention
    output, key shift on long-window layers, a layer without attention, one gated
    skip, backout, sigmoid softcap. Medium track: two input embeddings mixed per
    block, 5 value embeddings, three plain skips, rational softcap.
    Built on the CPU (so the initial weights do not depend on the device), then moved to `device`;
    the attention backend and the compute dtype are chosen then, for that device.
    """

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.cfg = cfg
        L, dim = cfg.num_layers, cfg.model_dim
        vocab = padded_vocab_size(cfg)
        self.dtype = dtype = resolve_dtype(cfg.compute_dtype, device or "cpu")
        head = torch.empty(vocab, dim)
        nn.init.normal_(head, std=cfg.head_init_std) if cfg.head_init_std > 0 else nn.init.zeros_(head)
        self.lm_head = labelled(head if cfg.fp32_head else head.to(dtype), "lm_head")
        # With a tied head the token embedding is the head matrix itself.
        num_tables = cfg.input_embeds - (1 if cfg.tie_embedding else 0)
        self.embeds = nn.ParameterList(labelled(torch.randn(vocab, dim).to(dtype), "embed") for _ in range(num_tables))
        # The input table of a tied embedding once it is untied (untie_embedding); unused before.
        self.untied_embed = (labelled(torch.zeros(vocab, dim, dtype=self.lm_head.dtype), "untied_embed")
                             if cfg.untie_embedding_frac > 0 else None)
        self.embedding_untied = False
        num_value_embeds = len({c for c in cfg.value_embed_pattern if c != "."})
        self.value_embeds = nn.ParameterList(
            labelled((torch.randn(vocab, dim) * cfg.value_embed_init_std).to(dtype), "value_embed")
            for _ in range(num_value_embeds))
        gate_dtype = torch.float32 if cfg.fp32_gates else dtype
        self.smear_gate = (labelled(torch.zeros(1, cfg.gate_dims, dtype=gate_dtype), "smear_gate")
                           if cfg.smear_gate else None)
        # One row per skip connection: a per-token factor 2*sigmoid(row . x0[:gate_dims]), 1 at init.
        self.skip_gates = (labelled(torch.zeros(len(cfg.skip_connections), cfg.gate_dims, dtype=gate_dtype), "skip_gate")
                           if cfg.skip_token_gate and cfg.skip_connections else None)
        self.blocks = nn.ModuleList(Block(cfg, layer, dtype) for layer in range(L))
        if cfg.matrix_storage == "split_bfloat16" and dtype == torch.bfloat16:
            with torch.no_grad():  # the record initialises in fp32, then stores bfloat16 (remainder zero)
                for p in self.blocks.parameters():
                    if p.label in ("attn", "mlp_fc", "mlp_proj"):
                        p.copy_(p.bfloat16().float())
        self.rotary = Rotary(cfg.head_dim, cfg.rotary_min_freq, cfg.rotary_pairs)
        self.register_buffer("attn_scale", torch.tensor(cfg.attn_scale))  # persistent: YaRN changes it
        self.x0_lambdas = labelled(torch.zeros(L, cfg.input_embeds), "x0_lambdas")
        self.bigram_embed = self.bigram_lambdas = None
        if cfg.bigram_vocab > 0:
            self.bigram_embed = labelled(torch.zeros(cfg.bigram_vocab, cfg.bigram_dim, dtype=dtype), "bigram_embed")
            self.register_buffer("bigram_signs", torch.randn(cfg.bigram_sign_rows, cfg.bigram_dim).sign().to(dtype))
            self.bigram_lambdas = labelled(torch.full((L,), cfg.bigram_lambda_init), "bigram_lambdas")
        # Every other learned scalar lives in one vector (one small optimiser group). "qkv" and "out"
        # are the sa lambdas: QKV and O scales, or on the normed value path the weights of v and ve.
        block_form = cfg.residual_form == "block"
        layout = {"resid": L if block_form else 0, "qkv": L, "out": L, "skip": len(cfg.skip_connections),
                  "smear": int(cfg.smear_gate), "backout": int(cfg.backout_layer >= 0)}
        self.scalar_slices, start = {}, 0
        for name, size in layout.items():
            self.scalar_slices[name] = slice(start, start + size)
            start += size
        scalars = torch.zeros(start)
        scalars[self.scalar_slices["resid"]] = cfg.resid_lambda_init
        scalars[self.scalar_slices["qkv"]] = cfg.sa_lambda_init[0]
        scalars[self.scalar_slices["out"]] = cfg.sa_lambda_init[1]
        scalars[self.scalar_slices["skip"]] = cfg.skip_init
        scalars[self.scalar_slices["backout"]] = cfg.backout_init
        self.scalars = labelled(scalars, "scalars")
        self.resid_lambdas = self.post_lambdas = None
        if not block_form:  # per sublayer (attention, MLP) of every layer
            self.resid_lambdas = labelled(torch.full((L, 2), math.sqrt(cfg.resid_lambda_init)), "resid_lambdas")
            self.post_lambdas = labelled(torch.ones(L, 2), "post_lambdas")
        self.mudd_w1 = self.mudd_w2 = self.mudd_b2 = None
        if cfg.mudd_sources:  # two coefficient MLPs: the last layer's (14 outputs) and the one after it (5)
            bound = 1 / math.sqrt(dim)
            self.mudd_w1 = labelled(torch.empty(2, cfg.mudd_hidden, dim).uniform_(-bound, bound).to(dtype), "mudd_w1")
            self.mudd_w2 = labelled(torch.zeros(2, MUDD_COEFFS, cfg.mudd_hidden, dtype=dtype), "mudd_w2")
            # Biases (x0.1 in use) that start the last layer as the static path (its value embedding weighted
            # 2, a zero-init gate's 2*sigmoid(0) doubled), residual scales sqrt(resid_lambda_init) and 1, bigram
            # weight bigram_lambda_init; after it a backout of layer a.
            bias = torch.zeros(2, MUDD_COEFFS)
            bias[0, [6, 7]] = 20.0
            bias[0, [8, 12]] = math.sqrt(cfg.resid_lambda_init) / 0.1
            bias[0, [9, 13]] = 10.0
            bias[0, 11] = cfg.bigram_lambda_init / 0.1
            bias[1, 1] = -cfg.backout_init / 0.1
            self.mudd_b2 = labelled(bias.to(dtype), "mudd_b2")
        if cfg.prefix_token_weight > 0:  # not saved: rebuilt from the tokenizer
            self.register_buffer("prefix_tokens", gpt2_prefix_tokens(vocab), persistent=False)
        self.attention_backend = resolve_attention_backend(cfg.attention_backend, device or "cpu",
                                                           cfg.window_granularity)
        if device is not None:
            self.to(device)

    def scalar(self, name: str) -> torch.Tensor:
        return self.scalars[self.scalar_slices[name]]

    @torch.no_grad()
    def untie_embedding(self) -> None:
        """From now on the input lookup uses its own table, starting as a copy of the head (a schedule
        event, section 6; the optimiser set copies the head's Adam state alongside)."""
        self.untied_embed.copy_(self.lm_head)
        self.embedding_untied = True

    def get_extra_state(self) -> dict:
        """Saved with the weights (checkpoints, the warm-up's restore): which input table is in use."""
        return {"embedding_untied": self.embedding_untied}

    def set_extra_state(self, state: dict) -> None:
        self.embedding_untied = state["embedding_untied"]

    def after_optimizer_step(self, step: int) -> None:
        """Refresh what depends on the new weights: the delayed FP8 scales of the MLP down projections."""
        for block in self.blocks:
            if block.mlp.fp8:
                block.mlp.refresh_fp8_proj_scale(step)

    def rescale_rotary(self, old_window: int, new_window: int) -> None:
        """YaRN update when the long window grows (a schedule event, section 6)."""
        if self.cfg.yarn and new_window > old_window:
            self.rotary.yarn_rescale(old_window, new_window, self.cfg.yarn_alpha, self.cfg.yarn_beta)
            self.attn_scale.mul_(1 + self.cfg.yarn_attn_gain * math.log(new_window / old_window))

    def input_embeddings(self, tokens: torch.Tensor, segments: Segments) -> list[torch.Tensor]:
        tied = self.untied_embed if self.embedding_untied else self.lm_head
        tables = ([tied] if self.cfg.tie_embedding else []) + list(self.embeds)
        x = F.embedding(tokens, tables[0]).to(self.dtype)
        if self.smear_gate is not None:  # mix in a gated share of the previous token's embedding
            gate = torch.sigmoid(F.linear(x[:, :self.cfg.gate_dims], self.smear_gate.type_as(x)))
            previous = shift_to_next_position(x, segments, self.cfg.mask_document_starts)
            x = x + self.scalar("smear").type_as(x) * gate * previous
        return [rms_norm(x)] + [rms_norm(F.embedding(tokens, table)) for table in tables[1:]]

    def layer_inputs(self, tokens, segments: Segments, windows: tuple[int, int], paired: bool = False) -> LayerInputs:
        """paired: the inputs of paired-head layers, whose sequence (segments) is twice as long."""
        cfg = self.cfg
        long_window, short_window = windows
        by_kind = {"L": long_window, "S": short_window}
        block = cfg.window_block if cfg.window_granularity == "block" else 0
        make_mask = ATTENTION_MASKS[self.attention_backend]
        kinds = {w for layer, w in enumerate(cfg.window_pattern)
                 if w != "N" and layer_marked(cfg.paired_head_pattern, layer, "P") == paired}
        masks = {by_kind[kind]: make_mask(segments, by_kind[kind], block) for kind in kinds}
        doubled = None
        if not paired and "P" in cfg.paired_head_pattern:
            doubled = self.layer_inputs(None, make_segments(segments.cu_seqlens * 2, segments.max_seqlen * 2,
                                                            2 * segments.position.numel()), windows, paired=True)
        return LayerInputs(segments=segments, angles=self.rotary(segments.position), adjacent_pairs=self.rotary.adjacent,
                           position_free=self.rotary.position_free_dims(), attn_scale=self.attn_scale,
                           backend=self.attention_backend, windows=by_kind, masks=masks,
                           value_embeds=[] if paired else [F.embedding(tokens, table) for table in self.value_embeds],
                           paired=doubled)

    def hidden_states(self, tokens, cu_seqlens, max_seqlen: int, windows: tuple[int, int]) -> torch.Tensor:
        """windows: (long, short) attention windows in tokens."""
        cfg = self.cfg
        segments = make_segments(cu_seqlens, max_seqlen, tokens.numel())
        x0 = self.input_embeddings(tokens, segments)
        bigram = None
        if self.bigram_embed is not None:
            # Layer 0's share goes into x0 itself (the skip gates and every x0 mix see it, as in the
            # record); each later layer's is added after its attention sublayer.
            rows, signs = bigram_rows(tokens, cfg.bigram_vocab, cfg.bigram_sign_rows)
            bigram = F.embedding(rows, self.bigram_embed).type_as(x0[0]) * self.bigram_signs[signs]
            bigram_weights = self.bigram_lambdas.type_as(x0[0])
            x0[0] = add_to_leading_dims(x0[0], bigram_weights[0] * bigram)
        ctx = self.layer_inputs(tokens, segments, windows)
        resid, qkv_scale, out_scale = (self.scalar(n).type_as(x0[0]) for n in ("resid", "qkv", "out"))
        if self.resid_lambdas is not None:
            resid, post = self.resid_lambdas.type_as(x0[0]), self.post_lambdas.type_as(x0[0])
        skip_weights = self.scalar("skip").type_as(x0[0])
        if cfg.skip_gate == "sigmoid":
            skip_weights = torch.sigmoid(skip_weights)
        if self.skip_gates is not None:  # (T, skips): each skip's weight per token
            gates = 2 * torch.sigmoid(F.linear(x0[0][:, :cfg.gate_dims], self.skip_gates.type_as(x0[0])))
            skip_weights = skip_weights * gates
        x0_lambdas = self.x0_lambdas.type_as(x0[0])
        saved, x, attention_input = {}, x0[0], None
        for i, block in enumerate(self.blocks):
            if self.mudd_w1 is not None and i == cfg.num_layers - 1:  # x is saved[i - 1] (no skip lands here)
                x = self.mudd_last_layer(block, x, x0[0], saved, ctx, qkv_scale[i], out_scale[i], bigram,
                                         attention_input)
                x = self.mudd_after_last_layer(x, x0[0], saved, ctx)
                return rms_norm(x)
            for j, (to, frm) in enumerate(cfg.skip_connections):
                if to == i:
                    x = x + skip_weights[..., j, None] * saved[frm]
            x0_mix = sum(x0_lambdas[i, e] * x0[e] for e in range(len(x0)))
            sublayer_mix = None
            if self.resid_lambdas is None:
                x = resid[i] * x + x0_mix
            else:
                sublayer_mix = (resid[i], post[i], x0_mix)
            injects = bigram is not None and i > 0 and block.attn is not None
            after_attention = bigram_weights[i] * bigram if injects else None
            x = block(x, ctx, qkv_scale[i], out_scale[i], after_attention, attention_input, sublayer_mix)
            saved[i] = x
            if i == cfg.attention_source_layer:  # the later layers attend over this layer's output
                attention_input = rms_norm(x)
        if cfg.backout_layer >= 0:  # remove part of an intermediate layer's contribution before the head
            x = x - self.scalar("backout").type_as(x) * saved[cfg.backout_layer]
        return rms_norm(x)

    def mudd_coefficients(self, x: torch.Tensor, which: int, count: int) -> torch.Tensor:
        """(T, count) per-token coefficients: 0.1 * (W2 gelu(W1 x) + b2) of MLP `which`."""
        hidden = F.gelu(F.linear(x, self.mudd_w1[which].type_as(x)))
        return 0.1 * (F.linear(hidden, self.mudd_w2[which, :count].type_as(x)) + self.mudd_b2[which, :count].type_as(x))

    def mudd_last_layer(self, block: Block, x, first, saved: dict, ctx: LayerInputs, qkv_scale, out_scale, bigram,
                        attention_input) -> torch.Tensor:
        """The last layer with MUDD (short #89): c = coefficients of its input x; with a = layer
        mudd_sources[0]'s output: values get c0 x0 + c1 a + c2 x and the value embedding weighted c6 (first
        half of the heads) / c7 (second half); x <- (1 + c5) x + c3 x0 + c4 a; x <- c8 x + c9 attention +
        c10 x0 (+ c11 bigram); x <- c12 x + c13 MLP(norm x)."""
        c = self.mudd_coefficients(x, 0, MUDD_COEFFS).unbind(-1)
        a = saved[self.cfg.mudd_sources[0]]
        value_addend = c[0][:, None] * first + c[1][:, None] * a + c[2][:, None] * x
        if block.value_embed_index is not None:
            heads, half = self.cfg.num_heads, self.cfg.num_heads // 2
            per_head = torch.stack([c[6]] * half + [c[7]] * (heads - half), dim=-1)  # (T, heads)
            value_embed = ctx.value_embeds[block.value_embed_index].type_as(x).view(x.size(0), heads, -1)
            value_addend = value_addend + (per_head[..., None] * value_embed).flatten(1)
        x = (1 + c[5][:, None]) * x + c[3][:, None] * first + c[4][:, None] * a
        attended = block.attn(rms_norm(x) if attention_input is None else attention_input, None, ctx, qkv_scale,
                              out_scale, value_addend)
        x = c[8][:, None] * x + c[9][:, None] * attended + c[10][:, None] * first
        if bigram is not None:
            x = add_to_leading_dims(x, c[11][:, None] * bigram)
        return c[12][:, None] * x + c[13][:, None] * block.mlp(rms_norm(x))

    def mudd_after_last_layer(self, x, first, saved: dict, ctx: LayerInputs) -> torch.Tensor:
        """x + n0 x0 + n1 (layer a's output) + n2 (the last layer's input) + n3 (value-embedding table 0)
        + n4 (layer b's output), n = coefficients of x (n1 starts at -0.5: a backout of layer a)."""
        n = self.mudd_coefficients(x, 1, 5).unbind(-1)
        a, b = (saved[layer] for layer in self.cfg.mudd_sources)
        last_input = saved[self.cfg.num_layers - 2]
        return (x + n[0][:, None] * first + n[1][:, None] * a + n[2][:, None] * last_input
                + n[3][:, None] * ctx.value_embeds[0].type_as(x) + n[4][:, None] * b)

    def logits(self, tokens, cu_seqlens, max_seqlen: int, windows: tuple[int, int]) -> torch.Tensor:
        """Soft-capped logits, (T, padded vocab), fp32 under no_grad (see head); for evaluation and tests."""
        return self.head(self.hidden_states(tokens, cu_seqlens, max_seqlen, windows))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Soft-capped logits. In training (gradients on) the records use the FP8 head on CUDA and keep
        the logits in the compute dtype (the softcap computed in fp32, rounded once); validation uses a
        plain matmul and fp32 logits."""
        cfg = self.cfg
        training = torch.is_grad_enabled()
        if cfg.fp8_head and (training or cfg.fp8_head_in_validation) and fp8_supported(x):
            z = fp8_linear(x, self.lm_head, *cfg.fp8_scales)[0]
        else:
            z = F.linear(x, self.lm_head.type_as(x))
        logits = softcap(z.float(), cfg.softcap, cfg.softcap_scale, cfg.softcap_offset)
        return logits.to(x.dtype) if training and not cfg.fp32_train_logits else logits

    def forward(self, tokens, targets, cu_seqlens, max_seqlen: int, windows: tuple[int, int],
                loss_piece: int = 0, target_weights: torch.Tensor | None = None,
                prefix_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Summed (not averaged) cross-entropy over the micro-batch's tokens. With loss_piece > 0 the
        head and loss run over pieces of that many tokens, so a long validation chunk never holds
        all its (T x vocab) logits at once. target_weights (K,): multi-token prediction; prefix_weight
        (scalar): the prefix-token loss; both below."""
        x = self.hidden_states(tokens, cu_seqlens, max_seqlen, windows)
        T = x.size(0)
        piece = loss_piece if 0 < loss_piece < T else T
        if target_weights is None and prefix_weight is None:
            return sum(F.cross_entropy(self.head(x[i:i + piece]), targets[i:i + piece], reduction="sum")
                       for i in range(0, T, piece))
        # Multi-token prediction: position t also predicts the target k positions after its own,
        # in packed order across documents as the record, with weight target_weights[k]; the last k
        # positions have no target at offset k. One head and one set of logits serve every k.
        if target_weights is None:
            target_weights = x.new_ones(1, dtype=torch.float32)
        later = torch.arange(T, device=x.device)[:, None] + torch.arange(target_weights.numel(), device=x.device)
        weights = torch.where(later < T, target_weights, 0.0)
        wanted = targets[later.clamp_max(T - 1)]
        if prefix_weight is not None:  # the target's longest proper prefix token, where it has one (short #88)
            prefix = self.prefix_tokens[targets.long()]
            wanted = torch.cat([wanted, prefix.clamp_min(0)[:, None]], dim=1)
            weights = torch.cat([weights, torch.where(prefix >= 0, prefix_weight, 0.0)[:, None]], dim=1)
        total = x.new_zeros((), dtype=torch.float32)
        for i in range(0, T, piece):
            logits = self.head(x[i:i + piece]).float()
            nll = logits.logsumexp(-1, keepdim=True) - logits.gather(1, wanted[i:i + piece])
            total = total + (nll * weights[i:i + piece]).sum()
        return total


MUDD_COEFFS = 14  # the last layer's per-token coefficients (the post-loop mix uses the first 5)


def gpt2_prefix_tokens(vocab: int) -> torch.Tensor:
    """(vocab,) int64: for each GPT-2 token, the token whose bytes are its longest proper prefix among the
    ordinary tokens (-1: none, as for single bytes, special tokens and padding rows)."""
    try:
        import tiktoken
        encoding = tiktoken.get_encoding("gpt2")
    except Exception as e:  # no package, or no cached BPE files and no network
        raise ConfigError(f"--prefix-token-weight: the GPT-2 tokenizer is not available ({type(e).__name__}: "
                          f"{e}); install tiktoken and run once with network, or set TIKTOKEN_CACHE_DIR") from None
    special = {encoding.encode_single_token(name) for name in encoding.special_tokens_set}
    ordinary = [i for i in range(encoding.n_vocab) if i not in special]
    token_of = {encoding.decode_single_token_bytes(i): i for i in ordinary}
    table = torch.full((vocab,), -1, dtype=torch.long)
    for i in ordinary:
        text = encoding.decode_single_token_bytes(i)
        for end in range(len(text) - 1, 0, -1):
            if text[:end] in token_of:
                table[i] = token_of[text[:end]]
                break
    return table


def padded_vocab_size(cfg: ModelConfig) -> int:
    return cfg.vocab_pad_multiple * math.ceil(cfg.vocab_size / cfg.vocab_pad_multiple)



# =============================================================================
# 4. Orthogonalisation
# =============================================================================
# Both methods map G = U S V^T to approximately U V^T with a fixed polynomial
# iteration X <- a X + (b A + c A^2) X, A = X X^T, run in bf16 on the wide
# orientation (rows <= cols) so A is the small Gram matrix. Inputs may carry
# leading batch dimensions; every matrix in the batch is handled independently.
#
# A and b A + c A^2 are symmetric, so two Triton kernels compute only the tiles of
# the lower triangle and write each one twice (in place and mirrored): 21 of 36
# tiles for 768 rows in 128-row tiles, approaching half as the tile count grows.
# Every public function takes `use_triton`: "auto" (Triton for bf16 CUDA tensors
# when triton is importable, torch otherwise), False (always torch) or True
# (always Triton; also runs on CPU tensors under TRITON_INTERPRET=1, which is how
# the tests check the kernels).
# Triton's CPU interpreter cannot multiply bf16 (it holds them as raw 16-bit
# integers), so for CPU tensors the kernels upcast tiles to fp32 before tl.dot;
# the math is unchanged (products of bf16 values are exact in fp32, and the GPU
# accumulates in fp32 too).

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the kernels are unavailable, torch path only
    triton = None
    tl = None

NS_CLASSIC_COEFFS = ((3.4445, -4.7750, 2.0315),) * 5
NS_PER_ITERATION_COEFFS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Hopper-sized tiles: 128x128 output tiles, 64-wide reduction steps.
TRITON_BLOCK = 128
TRITON_BLOCK_K = 64
TRITON_NUM_WARPS = 8
TRITON_NUM_STAGES = 3

if triton is not None:

    @triton.jit
    def _lower_triangle_tile(tile):
        """(row, col) of tile number `tile`, lower-triangle tiles numbered row by row."""
        # Row r starts at tile r(r+1)/2; invert with a square root, then correct the
        # fp32 rounding so the result is exact for any tile count.
        row = ((tl.sqrt(8.0 * tile + 1.0) - 1.0) * 0.5).to(tl.int32)
        row = tl.where(row * (row + 1) // 2 > tile, row - 1, row)
        row = tl.where((row + 1) * (row + 2) // 2 <= tile, row + 1, row)
        return row, tile - row * (row + 1) // 2

    @triton.jit
    def _store_symmetric_tile(C, tile, rows, cols, m, stride_row, stride_col, off_diagonal):
        """Write tile C[rows, cols] and, off the diagonal, its transpose at C[cols, rows]."""
        row_ok = rows < m
        col_ok = cols < m
        tl.store(C + rows[:, None] * stride_row + cols[None, :] * stride_col, tile,
                 mask=row_ok[:, None] & col_ok[None, :])
        if off_diagonal:
            tl.store(C + cols[:, None] * stride_row + rows[None, :] * stride_col, tl.trans(tile),
                     mask=col_ok[:, None] & row_ok[None, :])

    @triton.jit
    def _gram_kernel(X, C, m, n, sx_batch, sx_row, sx_col, sc_batch, sc_row, sc_col,
                     BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, DOT_IN_FP32: tl.constexpr):
        """C[b] = X[b] X[b]^T; grid = (lower-triangle tiles, batch)."""
        row, col = _lower_triangle_tile(tl.program_id(0))
        batch = tl.program_id(1).to(tl.int64)
        X += batch * sx_batch
        C += batch * sc_batch
        rows = row * BLOCK + tl.arange(0, BLOCK)
        cols = col * BLOCK + tl.arange(0, BLOCK)
        ks = tl.arange(0, BLOCK_K)
        left = X + rows[:, None] * sx_row + ks[None, :] * sx_col  # X[rows, k]
        right = X + ks[:, None] * sx_col + cols[None, :] * sx_row  # X[cols, k]^T
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k in range(0, tl.cdiv(n, BLOCK_K)):
            k_ok = ks < n - k * BLOCK_K
            a = tl.load(left, mask=(rows[:, None] < m) & k_ok[None, :], other=0.0)
            b = tl.load(right, mask=k_ok[:, None] & (cols[None, :] < m), other=0.0)
            if DOT_IN_FP32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
            left += BLOCK_K * sx_col
            right += BLOCK_K * sx_col
        _store_symmetric_tile(C, acc.to(C.dtype.element_ty), rows, cols, m, sc_row, sc_col, row != col)

    @triton.jit
    def _gram_polynomial_kernel(A, C, m, coeff_b, coeff_c, sa_batch, sa_row, sa_col, sc_batch, sc_row, sc_col,
                                BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, DOT_IN_FP32: tl.constexpr):
        """C[b] = coeff_b A[b] + coeff_c A[b] A[b] for symmetric A[b]; grid = (lower-triangle tiles, batch)."""
        row, col = _lower_triangle_tile(tl.program_id(0))
        batch = tl.program_id(1).to(tl.int64)
        A += batch * sa_batch
        C += batch * sc_batch
        rows = row * BLOCK + tl.arange(0, BLOCK)
        cols = col * BLOCK + tl.arange(0, BLOCK)
        row_ok = rows < m
        col_ok = cols < m
        ks = tl.arange(0, BLOCK_K)
        left = A + rows[:, None] * sa_row + ks[None, :] * sa_col  # A[rows, k]
        right = A + ks[:, None] * sa_row + cols[None, :] * sa_col  # A[k, cols]
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k in range(0, tl.cdiv(m, BLOCK_K)):
            k_ok = ks < m - k * BLOCK_K
            a = tl.load(left, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(right, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_IN_FP32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
            left += BLOCK_K * sa_col
            right += BLOCK_K * sa_row
        a_tile = tl.load(A + rows[:, None] * sa_row + cols[None, :] * sa_col,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        result = coeff_c * acc + coeff_b * a_tile.to(tl.float32)
        _store_symmetric_tile(C, result.to(C.dtype.element_ty), rows, cols, m, sc_row, sc_col, row != col)


def _triangle_grid(m: int, batch: int, block: int) -> tuple[int, int]:
    blocks = triton.cdiv(m, block)
    return blocks * (blocks + 1) // 2, batch


def _check_triton_input(X: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("use_triton=True, but triton is not installed")
    if X.dtype != torch.bfloat16 or X.ndim < 2:
        raise ValueError(f"the Triton kernels take bf16 matrices, got {X.dtype} of shape {tuple(X.shape)}")


def triton_gram(X: torch.Tensor, block: int = TRITON_BLOCK, block_k: int = TRITON_BLOCK_K,
                num_warps: int = TRITON_NUM_WARPS, num_stages: int = TRITON_NUM_STAGES) -> torch.Tensor:
    """X X^T for bf16 (..., m, n) with the lower-triangle Triton kernel (fp32 accumulation)."""
    _check_triton_input(X)
    *batch_shape, m, n = X.shape
    X3 = X.reshape(-1, m, n)
    C = torch.empty((X3.size(0), m, m), dtype=X.dtype, device=X.device)
    _gram_kernel[_triangle_grid(m, X3.size(0), block)](
        X3, C, m, n, *X3.stride(), *C.stride(), BLOCK=block, BLOCK_K=block_k, DOT_IN_FP32=not X.is_cuda,
        num_warps=num_warps, num_stages=num_stages)
    return C.reshape(*batch_shape, m, m)


def triton_gram_polynomial(A: torch.Tensor, b: float, c: float, block: int = TRITON_BLOCK,
                           block_k: int = TRITON_BLOCK_K, num_warps: int = TRITON_NUM_WARPS,
                           num_stages: int = TRITON_NUM_STAGES) -> torch.Tensor:
    """b A + c A A for symmetric bf16 (..., m, m) with the lower-triangle Triton kernel.

    Only the lower triangle of the result is computed, so A must be symmetric."""
    _check_triton_input(A)
    *batch_shape, m, m_cols = A.shape
    if m != m_cols:
        raise ValueError(f"gram_polynomial needs square matrices, got shape {tuple(A.shape)}")
    A3 = A.reshape(-1, m, m)
    C = torch.empty((A3.size(0), m, m), dtype=A.dtype, device=A.device)
    _gram_polynomial_kernel[_triangle_grid(m, A3.size(0), block)](
        A3, C, m, float(b), float(c), *A3.stride(), *C.stride(), BLOCK=block, BLOCK_K=block_k,
        DOT_IN_FP32=not A.is_cuda, num_warps=num_warps, num_stages=num_stages)
    return C.reshape(*batch_shape, m, m)


def triton_wanted(X: torch.Tensor, use_triton) -> bool:
    """Resolve a `use_triton` argument ("auto", True or False) for tensor X."""
    if use_triton == "auto":
        return triton is not None and X.is_cuda and X.dtype == torch.bfloat16
    if isinstance(use_triton, bool):
        return use_triton
    raise ValueError(f"use_triton must be 'auto', True or False, got {use_triton!r}")


def gram(X: torch.Tensor, use_triton="auto") -> torch.Tensor:
    """X X^T for a (batched) matrix."""
    return triton_gram(X) if triton_wanted(X, use_triton) else X @ X.mT


def gram_polynomial(A: torch.Tensor, b: float, c: float, use_triton="auto") -> torch.Tensor:
    """b A + c A A for a (batched) symmetric matrix A."""
    if triton_wanted(A, use_triton):
        return triton_gram_polynomial(A, b, c)
    return torch.baddbmm(A, A, A, beta=b, alpha=c) if A.ndim == 3 else b * A + c * (A @ A)


def polynomial_iteration(G: torch.Tensor, coeffs, norm_scale: float, norm_eps: float,
                         use_triton="auto", dtype=torch.bfloat16, split_update: bool = False) -> torch.Tensor:
    """dtype: what the iteration computes in (bf16 as the records; float32 on CPUs without native bf16).
    split_update: X <- B X rounded, then + a X rounded again (the short record's MLP path); else one
    fused multiply-add."""
    if G.ndim < 2:
        raise ValueError(f"orthogonalisation needs a matrix, got shape {tuple(G.shape)}")
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * norm_scale + norm_eps)
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])
    use_triton = triton_wanted(X, use_triton)
    for a, b, c in coeffs:
        B = gram_polynomial(gram(X, use_triton), b, c, use_triton)
        X = torch.bmm(B, X).add_(X, alpha=a) if split_update else torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    X = X.reshape(*batch_shape, *X.shape[-2:])
    return X.mT if tall else X


def newton_schulz(G: torch.Tensor, steps: int = 5, coeffs=NS_CLASSIC_COEFFS, use_triton="auto",
                  dtype=torch.bfloat16, split_update: bool = False) -> torch.Tensor:
    """Quintic Newton-Schulz (classic Muon): fixed or per-iteration coefficients."""
    coeffs = tuple(coeffs)
    return polynomial_iteration(G, [coeffs[min(i, len(coeffs) - 1)] for i in range(steps)], 1.0, 1e-7,
                                use_triton, dtype, split_update)


def newton_schulz_per_iteration(G: torch.Tensor, steps: int = 5, use_triton="auto",
                                dtype=torch.bfloat16, split_update: bool = False) -> torch.Tensor:
    """Newton-Schulz with the medium record's per-iteration coefficients."""
    return newton_schulz(G, steps, NS_PER_ITERATION_COEFFS, use_triton, dtype, split_update)


def polar_express(G: torch.Tensor, steps: int = 5, use_triton="auto", dtype=torch.bfloat16,
                  split_update: bool = False) -> torch.Tensor:
    """Polar Express (Amsel et al. 2025): per-iteration optimal coefficients, 2% norm safety margin."""
    coeffs = POLAR_EXPRESS_COEFFS
    return polynomial_iteration(G, [coeffs[min(i, len(coeffs) - 1)] for i in range(steps)], 1.02, 1e-6,
                                use_triton, dtype, split_update)


ORTHOGONALIZERS = {
    "polar_express": polar_express,
    "newton_schulz": newton_schulz,
    "newton_schulz_per_iteration": newton_schulz_per_iteration,
}


# =============================================================================
# 5. Optimisers
# =============================================================================
# Every parameter carries a string `label` (set by the model); the config's label table
# (LabelRule, section 1) routes each label to an optimiser and gives its lr/wd multipliers
# and Adam betas. A Muon parameter may also carry `normalise_columns`, one flag per matrix:
# the NorMuon axis where the layout alone does not decide it.
# Every optimiser is a GroupOptimizer (below): the training loop's OptimizerSet talks to
# DistAdam and Muon only through that interface.
# Gradients are AVERAGED over ranks, so with the loop's division by the micro-step count
# every world size sees the same gradient. Collectives start from post-accumulate-grad
# hooks during the last backward of a step (eager) or, for a compiled model whose hooks fire
# only after its backward graph, all at once in bucket order at the start of
# OptimizerSet.step(); they are waited on group by group as each group updates.
# World size 1 has no process group and no communication. Sums are reduced with SUM and
# divided by the world size (gloo has no AVG).

ADAM_SHARD_MIN_NUMEL = 1024  # smaller Adam params are all-reduced and updated whole on every rank


@dataclass
class ParamEntry:
    """A parameter as an optimiser sees it."""
    name: str
    param: nn.Parameter
    lr_mult: float = 1.0
    wd_mult: float = 1.0
    betas: tuple | None = None  # Adam's (beta1, beta2)
    normalise_columns: tuple | None = None  # NorMuon: per matrix, normalise columns (None: decide by shape)
    split_update: bool = False  # Muon: orthogonalise with the split multiply-add (polynomial_iteration)


def reduce_scatter_sum(output: torch.Tensor, input: torch.Tensor):
    """Async reduce-scatter (SUM) along dim 0; newer torch renamed the call."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, op=dist.ReduceOp.SUM, async_op=True)


def all_gather_dim0(output: torch.Tensor, input: torch.Tensor):
    """Async all-gather along dim 0."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, async_op=True)


class PendingGather:
    """An all-gather in flight, what to do with its result once it lands, and the buffers it
    reads or writes (kept referenced until then)."""

    def __init__(self, work, finish=None, buffers=()):
        self.work, self.finish, self.buffers = work, finish, buffers

    def wait(self) -> None:
        self.work.wait()
        if self.finish is not None:
            self.finish()


def weight_decay_per_step(style: str, wd: float, lr_t: float, eff_lr):
    """cautious: wd * lr_t * eff_lr (scales with the square of the schedule); decoupled: wd * lr_t."""
    return wd * lr_t * eff_lr if style == "cautious" else wd * lr_t


def decayed_step(param: torch.Tensor, direction: torch.Tensor, eff_lr, decay, cautious: bool,
                 strict: bool = False) -> torch.Tensor:
    """param - decay*param - eff_lr*direction (fp32). Cautious: decay only where direction and
    param do not have opposite signs (as the short record: a zero update, e.g. an embedding row absent
    from the batch, is decayed too); strict: only where they have the same sign."""
    shrink = param * decay
    if cautious:
        shrink = shrink * ((direction * param) > 0 if strict else (direction * param) >= 0)
    return param - shrink - eff_lr * direction


# --- the optimiser interface ----------------------------------------------------


class GroupOptimizer:
    """What the training loop's OptimizerSet asks of an optimiser over a group of parameters.

    The group is split into communication units (an Adam parameter, a Muon shape group), each
    with launch() (start averaging its gradient over ranks), `launched`, and release() (drop its
    gradients). The optimiser steps every `every`-th step, on the sum of those steps' gradients,
    and can be paused: while paused it drops its gradients and leaves its state alone.
    A subclass sets `units` and `unit_of` (id(param) -> unit) and implements update(),
    unit_complete(), state_dict() and load_state_dict().
    """

    units: list
    unit_of: dict

    def __init__(self, every: int = 1):
        self.every, self.pause_remaining, self.hooks_armed = every, 0, False

    def params(self) -> list:
        raise NotImplementedError

    def steps_at(self, step: int) -> bool:
        return self.pause_remaining == 0 and step % self.every == self.every - 1

    def pause(self, steps: int) -> None:
        self.pause_remaining = max(steps, 0)

    def arm_hooks(self, armed: bool) -> None:
        """Let the gradient hooks of the coming backward start communication (or not)."""
        self.hooks_armed = armed

    def on_grad_ready(self, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook: launch a unit as soon as all of its gradients are ready."""
        if self.hooks_armed:
            unit = self.unit_of[id(param)]
            if self.unit_complete(unit) and not unit.launched:
                unit.launch()

    def unit_complete(self, unit) -> bool:
        """Called once per gradient that arrives for `unit`: is the unit now complete?"""
        raise NotImplementedError

    def launch_all(self) -> None:
        """Start every reduction not started yet."""
        for unit in self.units:
            if not unit.launched:
                unit.launch()

    def step(self, step: int, lr_multiplier: float, momentum: float) -> list[PendingGather]:
        """Update (or keep accumulating, or drop while paused); returns the all-gathers in flight."""
        self.hooks_armed = False
        if self.pause_remaining > 0:
            self.pause_remaining -= 1
            for unit in self.units:
                unit.release()
            return []
        if not self.steps_at(step):
            return []  # keep accumulating gradients
        self.launch_all()  # anything the hooks did not start (one rank, or no hook fired)
        return self.update(step, lr_multiplier, momentum)

    def update(self, step: int, lr_multiplier: float, momentum: float) -> list[PendingGather]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


# --- Adam ---------------------------------------------------------------------


@dataclass
class AdamSettings:
    lr: float
    eps: float
    weight_decay: float
    wd_style: str = "cautious"
    wd_linear_lr_mult: bool = False  # cautious decay wd*lr^2*m instead of the record's wd*(lr*m)^2
    cautious_strict: bool = False  # decay only where update and weight have the same strict sign
    every: int = 1  # step every N-th step, on the sum of those steps' gradients
    bias_correction: bool = True
    moment_init: str = "zeros"
    nested_ema: bool = False
    eps_schedule: str = "constant"
    eps_end: float = 1e-8
    schedule_steps: int = 1  # the epsilon schedule runs over this many steps
    moment_dtype: str = "bfloat16"  # bfloat16 | float32 | param (the parameter's own dtype)
    eps_before_correction: bool = True  # m/(sqrt(v)+eps)*sqrt(c2)/c1 (short record); else m_hat/(sqrt(v_hat)+eps)

    def eps_at(self, step: int) -> float:
        """Epsilon grows over training (a decaying step size): linear, or geometric in log space."""
        x = min(step / max(self.schedule_steps, 1), 1.0)
        if self.eps_schedule == "linear":
            return self.eps + (self.eps_end - self.eps) * x
        if self.eps_schedule == "geometric":
            return self.eps * (self.eps_end / self.eps) ** x
        return self.eps


def adam_direction(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, t: int, betas: tuple,
                   s: AdamSettings, eps: float) -> torch.Tensor:
    """The Adam update direction for one tensor (fp32 math); t = 1 on the first update.
    Updates the moment buffers (stored in any dtype) in place."""
    beta1, beta2 = betas
    first = t == 1 and s.moment_init == "first_grad"
    m, v = exp_avg.float(), exp_avg_sq.float()
    v = grad.square() if first else v.lerp_(grad.square(), 1 - beta2)
    c1, c2 = (1 - beta1**t, 1 - beta2**t) if s.bias_correction else (1.0, 1.0)
    # sqrt(v_hat) + eps (textbook), or (sqrt(v) + eps) / sqrt(c2): eps joins sqrt(v) before the correction.
    denominator = (v.sqrt() + eps) / math.sqrt(c2) if s.eps_before_correction else v.sqrt() / math.sqrt(c2) + eps
    # Nested EMA normalises first and then averages; standard Adam averages first.
    target = grad / denominator if s.nested_ema else grad
    m = target.clone() if first else m.lerp_(target, 1 - beta1)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    return m / c1 if s.nested_ema else m / c1 / denominator


class AdamSlot:
    """One Adam parameter (a communication unit): its shard geometry (rows of dim 0) and moments."""

    def __init__(self, entry: ParamEntry, settings: AdamSettings, rank: int, world_size: int):
        param = entry.param
        if not param.is_contiguous():
            raise ValueError(f"parameter {entry.name!r} must be contiguous for DistAdam")
        self.name, self.param, self.lr_mult, self.wd_mult, self.betas = (
            entry.name, param, entry.lr_mult, entry.wd_mult, entry.betas)
        self.rows = param.size(0) if param.ndim > 0 else 1
        self.cols = param.numel() // max(self.rows, 1)
        self.world_size = world_size
        self.sharded = world_size > 1 and param.numel() >= ADAM_SHARD_MIN_NUMEL
        if self.sharded:
            self.rows_per_rank = -(-self.rows // world_size)
            self.padded_rows = self.rows_per_rank * world_size
            self.start = min(rank * self.rows_per_rank, self.rows)
            self.owned = min(self.rows, self.start + self.rows_per_rank) - self.start
        else:
            self.rows_per_rank, self.padded_rows, self.start, self.owned = self.rows, self.rows, 0, self.rows
        moment_dtype = param.dtype if settings.moment_dtype == "param" else getattr(torch, settings.moment_dtype)
        self.exp_avg = torch.zeros(self.rows_per_rank, self.cols, dtype=moment_dtype, device=param.device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.work = None  # reduction in flight
        self.grad_sent = self.grad_shard = None
        self.launched = False

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.rows, self.cols)

    def launch(self) -> None:
        """Start averaging this param's gradient over ranks (no-op on one rank)."""
        self.launched = True
        p = self.param
        if p.grad is None:  # an unused parameter this step: contributes zeros
            p.grad = torch.zeros_like(p)
        if self.world_size == 1:
            return
        if not self.sharded:
            self.work = dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True)
            return
        grad = self.flat(p.grad)
        if self.padded_rows > self.rows:
            padded = grad.new_zeros(self.padded_rows, self.cols)
            padded[: self.rows] = grad
            grad = padded
        self.grad_sent = grad  # kept alive until the reduction completes
        self.grad_shard = grad.new_empty(self.rows_per_rank, self.cols)
        self.work = reduce_scatter_sum(self.grad_shard, grad)

    def averaged_grad(self) -> torch.Tensor:
        """This rank's rows of the rank-averaged gradient, fp32."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        grad = self.grad_shard[: self.owned] if self.sharded else self.flat(self.param.grad)
        grad = grad.float()
        return grad / self.world_size if self.world_size > 1 else grad

    def release(self) -> None:
        self.param.grad = None
        self.launched = False
        self.grad_sent = self.grad_shard = None


class DistAdam(GroupOptimizer):
    """Adam over labelled params. Large params are reduce-scattered along dim 0 so each rank
    updates only its rows, then all-gathered; small ones are all-reduced and updated whole."""

    def __init__(self, entries: list[ParamEntry], settings: AdamSettings, rank: int, world_size: int):
        super().__init__(every=settings.every)
        self.settings, self.rank, self.world_size = settings, rank, world_size
        self.slots = [AdamSlot(entry, settings, rank, world_size) for entry in entries]
        self.units, self.unit_of = self.slots, {id(slot.param): slot for slot in self.slots}
        self.updates = 0  # Adam's t: number of updates applied

    def params(self) -> list:
        return [slot.param for slot in self.slots]

    def unit_complete(self, unit) -> bool:
        return True  # one parameter per slot

    def update(self, step: int, lr_multiplier: float, momentum: float) -> list[PendingGather]:
        self.updates += 1
        s = self.settings
        lr_t, eps = s.lr * lr_multiplier, s.eps_at(step)
        pending = [self.update_slot(slot, lr_t, eps) for slot in self.slots]
        for slot in self.slots:
            slot.release()
        return [p for p in pending if p is not None]

    def update_slot(self, slot: AdamSlot, lr_t: float, eps: float):
        s = self.settings
        grad = slot.averaged_grad()
        rows = slice(0, slot.owned)
        direction = adam_direction(grad, slot.exp_avg[rows], slot.exp_avg_sq[rows], self.updates, slot.betas, s, eps)
        eff_lr = lr_t * slot.lr_mult
        # The record's cautious Adam decay is wd*(lr*m)^2: the label multiplier m is squared too.
        lr_for_decay = lr_t if s.wd_style != "cautious" or s.wd_linear_lr_mult else eff_lr
        decay = slot.wd_mult * weight_decay_per_step(s.wd_style, s.weight_decay, lr_for_decay, eff_lr)
        flat = slot.flat(slot.param.data)
        owned = flat[slot.start: slot.start + slot.owned]
        new = decayed_step(owned.float(), direction, eff_lr, decay, s.wd_style == "cautious", s.cautious_strict)
        if not slot.sharded:
            owned.copy_(new)
            return None
        send = flat.new_zeros(slot.rows_per_rank, slot.cols)
        send[: slot.owned] = new
        if slot.padded_rows == slot.rows:
            return PendingGather(all_gather_dim0(flat, send), buffers=(send,))
        gathered = flat.new_empty(slot.padded_rows, slot.cols)
        return PendingGather(all_gather_dim0(gathered, send), lambda: flat.copy_(gathered[: slot.rows]),
                             buffers=(send, gathered))

    def state_dict(self) -> dict:
        return {"updates": self.updates, "pause_remaining": self.pause_remaining,
                "exp_avg": [slot.exp_avg for slot in self.slots],
                "exp_avg_sq": [slot.exp_avg_sq for slot in self.slots]}

    def load_state_dict(self, state: dict) -> None:
        self.updates, self.pause_remaining = state["updates"], state["pause_remaining"]
        for slot, m, v in zip(self.slots, state["exp_avg"], state["exp_avg_sq"], strict=True):
            slot.exp_avg.copy_(m)
            slot.exp_avg_sq.copy_(v)
            slot.launched, slot.work = False, None
        self.hooks_armed = False


# --- Muon / NorMuon -------------------------------------------------------------


@dataclass
class MuonSettings:
    lr: float
    weight_decay: float
    orthogonalize: object  # ORTHOGONALIZERS entry, called as (G, steps, dtype=...)
    orthogonalize_steps: int = 5
    orthogonalize_dtype: str = "auto"  # resolved on the parameters' device (resolve_dtype)
    wd_style: str = "cautious"
    shape_factor: str = "parameter"  # parameter | matrix: what sqrt(max(1, rows/cols)) is taken of
    variance_reduction: bool = True  # NorMuon
    beta2: float = 0.95
    smoothing: float = 0.0
    smoothing_start: float = 0.0
    smoothing_steps: int = 0

    def smoothing_at(self, step: int) -> float:
        if self.smoothing_steps <= 0:
            return self.smoothing
        x = min(step / self.smoothing_steps, 1.0)
        return self.smoothing_start + (self.smoothing - self.smoothing_start) * x

    @property
    def smoothing_enabled(self) -> bool:
        return self.smoothing > 0 or (self.smoothing_steps > 0 and self.smoothing_start > 0)


def nesterov_input(grad: torch.Tensor, momentum_buffer: torch.Tensor, momentum: float) -> torch.Tensor:
    """buffer <- lerp(buffer, g, 1 - mu); returns lerp(g, buffer, mu), the input to orthogonalise."""
    momentum_buffer.lerp_(grad, 1 - momentum)
    return grad.lerp(momentum_buffer, momentum)


def normuon_rescale(update: torch.Tensor, row_moment, col_moment, beta2: float, per_column=None) -> torch.Tensor:
    """NorMuon: EMA (beta2) of the mean square per row (row_moment, (..., rows, 1)) or per column
    (col_moment, (..., 1, cols)), divide by its sqrt, and rescale to keep each matrix's Frobenius
    norm. Pass one moment (the other None), or both and a (..., 1, 1) bool `per_column` choosing
    per matrix."""
    square = update.square()
    if row_moment is not None:
        row_moment.lerp_(square.mean(dim=-1, keepdim=True), 1 - beta2)
    if col_moment is not None:
        col_moment.lerp_(square.mean(dim=-2, keepdim=True), 1 - beta2)
    if col_moment is None:
        inverse_rms = row_moment.clamp_min(1e-10).rsqrt()
    elif row_moment is None:
        inverse_rms = col_moment.clamp_min(1e-10).rsqrt()
    else:
        inverse_rms = torch.where(per_column, col_moment.clamp_min(1e-10).rsqrt(), row_moment.clamp_min(1e-10).rsqrt())
    scaled = update * inverse_rms
    norm_before = update.norm(dim=(-2, -1), keepdim=True)
    norm_after = scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
    return scaled * (norm_before / norm_after)


class MuonShapeGroup:
    """All matrices of one (rows, cols) shape (a communication unit), stacked and padded to a
    multiple of the world size; this rank owns the contiguous chunk [start, start + chunk)."""

    def __init__(self, shape: tuple, entries: list[ParamEntry], settings: MuonSettings, rank: int, world_size: int):
        self.rows, self.cols = shape
        self.world_size = world_size
        split = {entry.split_update for entry in entries}
        if len(split) > 1:
            raise ValueError(f"Muon matrices of shape {shape} disagree on the split orthogonal update "
                             "(--orthogonalize-split-update): they are orthogonalised as one batch")
        self.split_update = split.pop()
        self.params, self.segments = [], []  # segments: (param, first, end) index range in the stack
        lr_scales, wd_mults, per_column = [], [], []
        for entry in entries:
            p = entry.param
            first = sum(end - begin for _, begin, end in self.segments)
            count = p.numel() // (self.rows * self.cols)
            self.params.append(p)
            self.segments.append((p, first, first + count))
            # "parameter": leading dims count as rows, so the fused (4, 768, 768) QKVO is (3072 x 768).
            lr_rows = self.rows * count if settings.shape_factor == "parameter" else self.rows
            lr_scales += [math.sqrt(max(1.0, lr_rows / self.cols)) * entry.lr_mult] * count
            wd_mults += [entry.wd_mult] * count
            # NorMuon axis: the entry's per-matrix flags, else per row when rows >= cols, per column otherwise.
            per_column += list(entry.normalise_columns or (self.rows < self.cols,) * count)
        self.count = len(lr_scales)
        self.chunk = -(-self.count // world_size)
        self.start = rank * self.chunk
        device = self.params[0].device
        owned = slice(self.start, self.start + self.chunk)
        pad = [0.0] * (self.chunk * world_size - self.count)
        self.lr_scale = torch.tensor(lr_scales + pad, device=device)[owned].view(-1, 1, 1)
        self.wd_mult = torch.tensor(wd_mults + pad, device=device)[owned].view(-1, 1, 1)
        matrix = (self.chunk, self.rows, self.cols)
        self.grad_chunk = torch.zeros(matrix, device=device)
        self.param_chunk = torch.zeros(matrix, device=device)
        # With several ranks, full-size stacks to reduce-scatter from and all-gather into.
        full = (self.chunk * world_size, self.rows, self.cols)
        self.grad_full = torch.zeros(full, device=device) if world_size > 1 else self.grad_chunk
        self.param_full = torch.zeros(full, device=device) if world_size > 1 else self.param_chunk
        self.momentum_buffer = torch.zeros(matrix, device=device)
        per_column = torch.tensor(per_column + [False] * len(pad), device=device)[owned]
        self.per_column = per_column.view(-1, 1, 1)
        any_rows, any_columns = settings.variance_reduction and not per_column.all(), per_column.any()
        self.row_moment = torch.zeros(self.chunk, self.rows, 1, device=device) if any_rows else None
        self.col_moment = (torch.zeros(self.chunk, 1, self.cols, device=device)
                           if settings.variance_reduction and any_columns else None)
        self.smoothed = torch.zeros(matrix, device=device) if settings.smoothing_enabled else None
        self.arrived = 0
        self.launched = False
        self.work = None

    def matrices(self, p: torch.Tensor) -> torch.Tensor:
        return p.view(-1, self.rows, self.cols)

    def owned_part(self, first: int, end: int):
        """The part of stack range [first, end) this rank owns, as (lo, hi) in stack indices."""
        return max(first, self.start), min(end, self.start + self.chunk)

    def launch(self) -> None:
        """Stack the gradients and start the reduce-scatter (on one rank: just stack)."""
        self.launched = True
        for p, first, end in self.segments:
            if p.grad is None:
                self.grad_full[first:end].zero_()
            else:
                self.grad_full[first:end].copy_(self.matrices(p.grad))
        if self.world_size > 1:
            self.work = reduce_scatter_sum(self.grad_chunk, self.grad_full)

    def averaged_grad(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.grad_chunk / self.world_size if self.world_size > 1 else self.grad_chunk

    def load_owned_params(self) -> torch.Tensor:
        for p, first, end in self.segments:
            lo, hi = self.owned_part(first, end)
            if lo < hi:
                self.param_chunk[lo - self.start: hi - self.start].copy_(self.matrices(p.data)[lo - first: hi - first])
        return self.param_chunk

    def store_params(self) -> None:
        """Write the (gathered) stack back into the parameters."""
        for p, first, end in self.segments:
            self.matrices(p.data).copy_(self.param_full[first:end])

    def release(self) -> None:
        for p in self.params:
            p.grad = None
        self.arrived, self.launched = 0, False


class Muon(GroupOptimizer):
    """Muon / NorMuon over labelled matrix params (any leading dims are a batch of matrices).
    Per step: Nesterov momentum, orthogonalise, optional NorMuon variance reduction, optional
    EMA update smoothing, then p <- p - decay*p - lr*sqrt(max(1, rows/cols))*label_mult*u, rows
    and cols those of the stored parameter or of each matrix (settings.shape_factor).
    Distributed by shape: reduce-scatter the stacked gradients, update the owned chunk as one
    batch, all-gather the new weights. Steps every step."""

    def __init__(self, entries: list[ParamEntry], settings: MuonSettings, rank: int, world_size: int):
        super().__init__(every=1)
        self.settings, self.rank, self.world_size = settings, rank, world_size
        by_shape: dict[tuple, list] = {}
        for entry in entries:
            p = entry.param
            if p.ndim < 2:
                raise ValueError(f"parameter {entry.name!r} (label {p.label!r}) is not a matrix: shape {tuple(p.shape)}")
            by_shape.setdefault(tuple(p.shape[-2:]), []).append(entry)
        self.groups = [MuonShapeGroup(shape, group, settings, rank, world_size) for shape, group in by_shape.items()]
        self.orthogonalize_dtype = resolve_dtype(settings.orthogonalize_dtype, entries[0].param.device)
        self.units, self.unit_of = self.groups, {id(p): g for g in self.groups for p in g.params}

    def params(self) -> list:
        return [p for g in self.groups for p in g.params]

    def unit_complete(self, unit: MuonShapeGroup) -> bool:
        unit.arrived += 1
        return unit.arrived == len(unit.params)

    def direction(self, group: MuonShapeGroup, grad: torch.Tensor, momentum: float, smoothing: float) -> torch.Tensor:
        s = self.settings
        update = s.orthogonalize(nesterov_input(grad, group.momentum_buffer, momentum), s.orthogonalize_steps,
                                 dtype=self.orthogonalize_dtype, split_update=group.split_update).float()
        if s.variance_reduction:
            update = normuon_rescale(update, group.row_moment, group.col_moment, s.beta2, group.per_column)
        if group.smoothed is not None:  # zero-initialised, no bias correction
            group.smoothed.mul_(smoothing).add_(update, alpha=1 - smoothing)
            update = group.smoothed
        return update

    def update(self, step: int, lr_multiplier: float, momentum: float) -> list[PendingGather]:
        s = self.settings
        lr_t, smoothing = s.lr * lr_multiplier, s.smoothing_at(step)
        pending = []
        for group in self.groups:
            direction = self.direction(group, group.averaged_grad(), momentum, smoothing)
            eff_lr = lr_t * group.lr_scale
            decay = group.wd_mult * weight_decay_per_step(s.wd_style, s.weight_decay, lr_t, eff_lr)
            params = group.load_owned_params()
            params.copy_(decayed_step(params, direction, eff_lr, decay, s.wd_style == "cautious"))
            group.release()
            if self.world_size == 1:
                group.store_params()
            else:
                pending.append(PendingGather(all_gather_dim0(group.param_full, group.param_chunk), group.store_params))
        return pending

    def state_dict(self) -> dict:
        return {"momentum_buffer": [g.momentum_buffer for g in self.groups],
                "row_moment": [g.row_moment for g in self.groups],
                "col_moment": [g.col_moment for g in self.groups],
                "smoothed": [g.smoothed for g in self.groups]}

    def load_state_dict(self, state: dict) -> None:
        for i, group in enumerate(self.groups):
            for name in ("momentum_buffer", "row_moment", "col_moment", "smoothed"):
                mine, saved = getattr(group, name), state[name][i]
                if (mine is None) != (saved is None):
                    raise ValueError(f"optimiser state mismatch in Muon {name}: saved with other settings")
                if mine is not None:
                    mine.copy_(saved)
            group.arrived, group.launched, group.work = 0, False, None
        self.hooks_armed = False


# --- Snoo ---------------------------------------------------------------------


class Snoo:
    """Step-K Nesterov outer optimiser (Kallusky et al. 2025) around any inner optimiser.
    After inner steps 1, 1+K, 1+2K, ...: delta = slow - current; b <- mu*b + delta;
    slow <- slow - lr*(delta + mu*b); current <- slow. Slow copy and b are fp32; the same on
    every rank, so no communication."""

    def __init__(self, params: list, lr: float, momentum: float, every: int):
        self.params, self.lr, self.momentum, self.every = list(params), lr, momentum, every
        self.slow = [p.detach().float().clone() for p in self.params]
        self.outer_momentum = [torch.zeros_like(s) for s in self.slow]  # b; mu*0 + delta starts it at delta
        self.inner_steps = 0

    @torch.no_grad()
    def after_inner_step(self) -> None:
        self.inner_steps += 1
        if (self.inner_steps - 1) % self.every:
            return
        for p, slow, b in zip(self.params, self.slow, self.outer_momentum):
            delta = slow - p.float()
            b.mul_(self.momentum).add_(delta)
            slow.sub_(delta.add_(b, alpha=self.momentum), alpha=self.lr)
            p.copy_(slow)

    def state_dict(self) -> dict:
        return {"inner_steps": self.inner_steps, "slow": self.slow, "outer_momentum": self.outer_momentum}

    def load_state_dict(self, state: dict) -> None:
        self.inner_steps = state["inner_steps"]
        for mine, saved in zip(self.slow + self.outer_momentum, state["slow"] + state["outer_momentum"], strict=True):
            mine.copy_(saved)


# --- the optimiser set used by the training loop ----------------------------------


def labelled_parameters(model: nn.Module, labels) -> list:
    """(name, param, label) for every trainable parameter; a missing or unknown label is an error."""
    result = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        label = getattr(p, "label", None)
        if label not in labels:
            raise ValueError(f"parameter {name!r} has optimiser label {label!r}; every parameter needs a "
                             f"`label` attribute, one of: {', '.join(labels)}")
        result.append((name, p, label))
    return result


class OptimizerSet:
    """Every optimiser of a run behind the interface the training loop uses (section 9):
    prepare_backward / step / pause_scalars / state_dict / load_state_dict. It owns gradient
    zeroing: a group's gradients are set to None once it has stepped (or dropped them).
    schedule_steps: the scheduled steps, over which Adam's epsilon schedule runs."""

    def __init__(self, model: nn.Module, cfg: OptimizerConfig, rank: int, world_size: int, schedule_steps: int = 1,
                 launch_from_hooks: bool = True):
        self.world_size = world_size
        # False for a compiled model: its hooks would fire only after the whole backward graph,
        # in autograd's order; step() then launches every reduction itself, in bucket order.
        self.launch_from_hooks = launch_from_hooks
        named = labelled_parameters(model, cfg.labels)
        self.params = [p for _, p, _ in named]
        adam_options = dict(eps=cfg.adam_eps, bias_correction=cfg.adam_bias_correction,
                            moment_init=cfg.adam_moment_init, nested_ema=cfg.adam_nested_ema,
                            eps_schedule=cfg.adam_eps_schedule, eps_end=cfg.adam_eps_end,
                            schedule_steps=schedule_steps, moment_dtype=cfg.adam_moment_dtype)
        self.scalar_adam = None
        if cfg.optimizer == "adamw":
            settings = AdamSettings(lr=cfg.adamw_lr, weight_decay=cfg.adamw_wd, wd_style="decoupled", every=1,
                                    eps_before_correction=False, **adam_options)
            entries = [ParamEntry(n, p, betas=cfg.adamw_betas) for n, p, _ in named]
            self.members: list[GroupOptimizer] = [DistAdam(entries, settings, rank, world_size)]
        else:
            def entries(kind):
                return [ParamEntry(n, p, cfg.labels[label].lr, cfg.labels[label].wd, cfg.labels[label].betas,
                                   getattr(p, "normalise_columns", None), label in cfg.orthogonalize_split_update)
                        for n, p, label in named if cfg.labels[label].optimizer == kind]
            adam = AdamSettings(lr=cfg.adam_lr, weight_decay=cfg.adam_wd, wd_style=cfg.wd_style, every=cfg.adam_every,
                                wd_linear_lr_mult=cfg.adam_wd_linear_lr_mult, cautious_strict=cfg.adam_cautious_strict,
                                eps_before_correction=cfg.adam_eps_before_correction, **adam_options)
            muon = MuonSettings(lr=cfg.muon_lr, weight_decay=cfg.muon_wd, orthogonalize=ORTHOGONALIZERS[cfg.orthogonalizer],
                                orthogonalize_steps=cfg.orthogonalizer_steps,
                                orthogonalize_dtype=cfg.orthogonalize_dtype, wd_style=cfg.wd_style,
                                shape_factor=cfg.muon_shape_factor, variance_reduction=cfg.optimizer == "normuon",
                                beta2=cfg.normuon_beta2, smoothing=cfg.muon_smoothing,
                                smoothing_start=cfg.muon_smoothing_start, smoothing_steps=cfg.muon_smoothing_steps)
            # Adam first: the head's gradient is the first to be ready in backward.
            self.members = []
            if entries("adam"):
                self.members.append(DistAdam(entries("adam"), adam, rank, world_size))
            if entries("scalar_adam"):
                self.scalar_adam = DistAdam(entries("scalar_adam"), adam, rank, world_size)
                self.members.append(self.scalar_adam)
            if entries("muon"):
                self.members.append(Muon(entries("muon"), muon, rank, world_size))
        self.snoo = Snoo(self.params, cfg.snoo_lr, cfg.snoo_momentum, cfg.snoo_every) if cfg.snoo else None
        if world_size > 1:  # start each group's communication as soon as its last gradient is ready
            for member in self.members:
                for p in member.params():
                    p.register_post_accumulate_grad_hook(member.on_grad_ready)

    def prepare_backward(self, step: int, last_micro_step: bool) -> None:
        """Arm the gradient hooks of the groups that step at `step` for the coming backward."""
        for member in self.members:
            member.arm_hooks(self.launch_from_hooks and self.world_size > 1 and last_micro_step
                             and member.steps_at(step))

    @torch.no_grad()
    def step(self, step: int, lr_multiplier: float, momentum: float) -> None:
        # Overlap design: in eager mode the hooks start each group's reduction during the last
        # backward, overlapping it. A compiled backward is one graph whose hooks would fire only
        # after it returns, so for a compiled model the hooks stay off and every reduction is
        # launched here at once, in bucket order (Adam first, then the Muon shape groups), before
        # any update: each group's update then overlaps the communication of the groups after it.
        for member in self.members:
            if member.steps_at(step):
                member.launch_all()
        pending = []
        for member in self.members:
            pending += member.step(step, lr_multiplier, momentum)
        for gather in pending:
            gather.wait()
        if self.snoo is not None:
            self.snoo.after_inner_step()

    def copy_adam_state(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Give `target` the Adam moments of `source` (same shape, same Adam group): the untied embedding
        starts where the head is. Adam's step count is shared by the group, so it carries over."""
        for member in self.members:
            slots = {id(slot.param): slot for slot in getattr(member, "slots", [])}
            if id(source) in slots and id(target) in slots:
                slots[id(target)].exp_avg.copy_(slots[id(source)].exp_avg)
                slots[id(target)].exp_avg_sq.copy_(slots[id(source)].exp_avg_sq)
                return
        raise ValueError("copy_adam_state: both parameters must be in the same Adam group "
                         "(--labels: untied_embed and lm_head on the same Adam optimiser)")

    def pause_scalars(self, steps: int) -> None:
        """Drop the scalar group's gradients for the next `steps` steps, keeping its moments."""
        if self.scalar_adam is not None:
            self.scalar_adam.pause(steps)

    def state_dict(self) -> dict:
        """Every buffer and counter (references: deepcopy or save it to keep it). Gradients still
        accumulating for a group that steps every N steps are included so a resume is exact."""
        return {"members": [m.state_dict() for m in self.members],
                "snoo": self.snoo.state_dict() if self.snoo is not None else None,
                "grads": [p.grad for p in self.params]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["members"]) != len(self.members) or (state["snoo"] is None) != (self.snoo is None):
            raise ValueError("optimiser state was saved with a different optimiser configuration")
        for member, saved in zip(self.members, state["members"]):
            member.load_state_dict(saved)
        if self.snoo is not None:
            self.snoo.load_state_dict(state["snoo"])
        for p, grad in zip(self.params, state["grads"], strict=True):
            p.grad = None if grad is None else grad.to(device=p.device, dtype=p.dtype, copy=True)


# =============================================================================
# 6. Schedules
# =============================================================================
# x = step / num_iterations. Batch size and window change in equal parts ("stages")
# of the scheduled steps; the extension steps after num_iterations run at the final
# batch size with a longer window and the minimum lr. `Schedule.at(step)` says
# everything a step needs: batch, windows, lr, momentum, and the transition events the
# loop applies before it (YaRN when the long window grows, the scalar pause at a stage change).


@dataclass(frozen=True)
class StepPlan:
    step: int
    batch_tokens: int
    windows: tuple  # (long, short) attention windows in tokens
    lr_multiplier: float
    momentum: float
    window_grew_from: int | None = None  # the long window grew from this at this step and YaRN applies: rescale rotary
    stage_changed: bool = False  # the batch/window stage changed at this step: pause the scalar Adam
    untie_embedding: bool = False  # the first step with an untied input embedding: copy the head and its Adam state
    target_weights: tuple | None = None  # multi-token prediction weights of targets t+1, t+2, ... (None: plain)
    prefix_weight: float | None = None  # weight of the prefix-token loss (None: none)
    max_seq_len: int | None = None  # this stage's longest training sequence (the compiled model's max_seqlen)


class Schedule:
    def __init__(self, cfg: ScheduleConfig, window_block: int, untie_step: int | None = None,
                 max_seq_len: int | None = None, prefix_token_weight: float = 0.0):
        """untie_step: the first step trained with an untied input embedding (None: never); max_seq_len:
        the data's, the longest sequence of a step whose stage sets none; prefix_token_weight: the
        prefix-token loss's starting weight (0: none)."""
        self.cfg, self.window_block, self.untie_step = cfg, window_block, untie_step
        self.prefix_token_weight = prefix_token_weight
        self.default_max_seq_len = max_seq_len
        self.total_steps = cfg.num_iterations + cfg.extension_iterations

    @classmethod
    def of(cls, cfg: Config) -> Schedule:
        """The schedule of a run (windows are counted in the model's blocks). The embedding is untied after
        the first Adam step at or past untie_embedding_frac of the scheduled steps (the record: 785), so
        no gradient of the tied table is still accumulating then."""
        untie_step = None
        if cfg.model.untie_embedding_frac > 0:
            every = cfg.optim.adam_every
            last_tied = math.ceil(cfg.model.untie_embedding_frac * cfg.schedule.num_iterations)
            last_tied += (every - 1 - last_tied) % every
            untie_step = last_tied + 1
        return cls(cfg.schedule, cfg.model.window_block, untie_step, cfg.data.max_seq_len,
                   cfg.model.prefix_token_weight)

    def stage_index(self, step: int) -> int:
        """0 .. num_stages-1 during the scheduled steps, num_stages in the extension."""
        stages = len(self.cfg.batch_tokens_stages)
        return min(stages * step // self.cfg.num_iterations, stages)

    def batch_tokens(self, step: int) -> int:
        i, cfg = self.stage_index(step), self.cfg
        return cfg.batch_tokens_stages[i] if i < len(cfg.batch_tokens_stages) else cfg.batch_tokens_extension

    def long_window(self, step: int) -> int:
        """Long attention window in tokens."""
        cfg, block = self.cfg, self.window_block
        if cfg.window_schedule == "cubic":  # medium track: grows smoothly, flattens, then rises again
            x = min(step / cfg.num_iterations, 1.0)
            tokens = cfg.window_cubic_max_tokens * (4 * x**3 - 6 * x**2 + 3 * x)
            return max(block, block * math.ceil(tokens / block))
        i = self.stage_index(step)
        stages = cfg.long_window_blocks_stages
        blocks = stages[min(i, len(stages) - 1)] if i < len(cfg.batch_tokens_stages) else cfg.long_window_blocks_extension
        return blocks * block

    def short_window(self, long_window: int) -> int:
        """Short window in tokens: half the long window's blocks, rounded down (3 -> 1, 7 -> 3, 13 -> 6),
        at most short_window_max_blocks when that is set."""
        blocks = long_window // self.window_block // 2
        if self.cfg.short_window_max_blocks > 0:
            blocks = min(blocks, self.cfg.short_window_max_blocks)
        return blocks * self.window_block

    def windows(self, step: int) -> tuple[int, int]:
        long_window = self.long_window(step)
        return long_window, self.short_window(long_window)

    def final_val_windows(self) -> tuple[int, int]:
        """(long, short) at the final validation: the long window jumps to long_window_blocks_final_val,
        the short layers keep the last training step's window (short record: 20 and 6 blocks)."""
        return (self.cfg.long_window_blocks_final_val * self.window_block,
                self.short_window(self.long_window(self.total_steps - 1)))

    def val_windows(self, step: int) -> tuple[int, int]:
        """A validation before step `step` uses that step's windows (the step's transitions, YaRN among them,
        are applied first, as the records do); the final one final_val_windows."""
        return self.final_val_windows() if step == self.total_steps else self.windows(step)

    def lr_stage_index(self, step: int) -> int:
        """The stage of the lr multiplier: the batch stage (lr_stage_start "at"), or, as the earlier records,
        once x is strictly past a stage start (x > k/stages): one step later where a stage starts exactly
        on a step."""
        if self.cfg.lr_stage_start == "at":
            return self.stage_index(step)
        stages = len(self.cfg.batch_tokens_stages)
        return max(0, min(-(-stages * step // self.cfg.num_iterations) - 1, stages))

    def lr_multiplier(self, step: int) -> float:
        """Stage multiplier held flat, then a linear cooldown towards lr_min_frac over the last cooldown_frac."""
        cfg = self.cfg
        x = step / cfg.num_iterations
        if x >= 1.0:
            return cfg.lr_min_frac
        stage_lrs = cfg.lr_stage_multipliers
        lr_max = stage_lrs[min(self.lr_stage_index(step), len(stage_lrs) - 1)]
        if x < 1.0 - cfg.cooldown_frac:
            return lr_max
        w = (1.0 - x) / cfg.cooldown_frac
        return lr_max * w + cfg.lr_min_frac * (1.0 - w)

    def momentum(self, step: int) -> float:
        """Warm up from momentum_min to momentum_max, cool back down over the last steps of the whole
        run, extension included (short record: 1950 -> 2000)."""
        cfg = self.cfg
        lo, hi = cfg.momentum_min, cfg.momentum_max
        if cfg.momentum_warmup_steps > 0:
            warm = min(step / cfg.momentum_warmup_steps, 1.0)
            momentum = lo + (hi - lo) * warm
        else:
            momentum = hi
        cool_start = self.total_steps - cfg.momentum_cooldown_steps
        if cfg.momentum_cooldown_steps > 0 and step >= cool_start:
            cool = min((step - cool_start) / cfg.momentum_cooldown_steps, 1.0)
            momentum = momentum + (lo - momentum) * cool
        return momentum

    def max_seq_len(self, step: int) -> int | None:
        stages = self.cfg.max_seq_len_stages
        return stages[min(self.stage_index(step), len(stages) - 1)] if stages else self.default_max_seq_len

    def target_weights(self, step: int) -> tuple | None:
        """Multi-token prediction weights (None: the plain next-token loss). With y = stages * step /
        num_iterations the progress in batch stages (y - k is the fraction through stage k): targets t+1, t+2,
        t+3 weigh 1, 0.5, 0.25(1 - y) for y < 1, then t+1, t+2 weigh 1, 0.5(2 - y) for y < 2 (both records)."""
        if not self.cfg.multi_token_prediction:
            return None
        y = len(self.cfg.batch_tokens_stages) * step / self.cfg.num_iterations
        if y < 1:
            return (1.0, 0.5, 0.25 * (1 - y))
        if y < 2:
            return (1.0, 0.5 * (2 - y))
        return None

    def prefix_weight(self, step: int) -> float | None:
        """The prefix-token loss weight: w through stage 0, w (2 - y) through stage 1 (y as above), then None."""
        if self.prefix_token_weight <= 0:
            return None
        y = len(self.cfg.batch_tokens_stages) * step / self.cfg.num_iterations
        return self.prefix_token_weight * min(1.0, 2 - y) if y < 2 else None

    def at(self, step: int) -> StepPlan:
        long_window = self.long_window(step)
        previous = self.long_window(step - 1) if step > 0 else long_window
        yarn_cap = self.cfg.yarn_max_window_blocks * self.window_block
        grew = long_window > previous and (yarn_cap == 0 or long_window <= yarn_cap)
        return StepPlan(step=step, batch_tokens=self.batch_tokens(step), windows=self.windows(step),
                        lr_multiplier=self.lr_multiplier(step), momentum=self.momentum(step),
                        window_grew_from=previous if grew else None,
                        stage_changed=step > 0 and self.stage_index(step) != self.stage_index(step - 1),
                        untie_embedding=step == self.untie_step, target_weights=self.target_weights(step),
                        prefix_weight=self.prefix_weight(step),
                        max_seq_len=self.max_seq_len(step))

    def untied_at(self, step: int) -> bool:
        return self.untie_step is not None and step >= self.untie_step

    def shape_steps(self) -> list[int]:
        """The first step of every distinct compiled shape the run trains with: batch size, window, whether
        the embedding is untied, how many targets each position predicts, and whether a prefix loss is on."""
        first = {}
        for step in range(self.total_steps):
            shape = (self.batch_tokens(step), self.long_window(step), self.untied_at(step),
                     len(self.target_weights(step) or ()), self.max_seq_len(step), self.prefix_weight(step) is None)
            first.setdefault(shape, step)
        return list(first.values())

    def all_val_windows(self, val_every: int) -> list[tuple[int, int]]:
        """Every window pair a validation of the run uses (val_every > 0: every val_every steps, and the end)."""
        steps = range(0, self.total_steps, val_every) if val_every > 0 else []
        return list(dict.fromkeys([self.val_windows(step) for step in steps] + [self.final_val_windows()]))


# =============================================================================
# 7. Logging
# =============================================================================
# Only rank 0 writes. The log starts with the exact bytes of this script, so a log
# alone reproduces its run; every line is flushed so a crash leaves a readable log.

END_OF_SCRIPT = "==== end of script: sha256={digest} bytes={size} ===="
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L4": 121.0, "4090": 165.2}


class RunLogger:
    def __init__(self, path: str | None, echo: bool = True):
        self.path, self.echo, self.file = path, echo, None
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            if os.path.exists(path):
                raise ConfigError(f"log {path} already exists; choose another --run-id or --log-dir")
            self.file = open(path, "xb")  # "x": a log is never overwritten

    def write_script(self, source: bytes) -> None:
        if self.file:
            self.file.write(source if source.endswith(b"\n") else source + b"\n")
            digest = hashlib.sha256(source).hexdigest()
            self.file.write((END_OF_SCRIPT.format(digest=digest, size=len(source)) + "\n").encode())
            self.file.flush()

    def __call__(self, line: str, console: bool = True) -> None:
        if self.file:
            self.file.write((line + "\n").encode())
            self.file.flush()
        if self.echo and console:
            print(line, flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None


def launch_command(argv: list[str]) -> str:
    """The command line that launched this run, as a user would type it."""
    args = " ".join(shlex.quote(a) for a in argv)
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ:
        nodes = os.environ.get("GROUP_WORLD_SIZE", "1")
        node_part = "--standalone" if nodes == "1" else f"--nnodes={nodes}"
        return f"torchrun {node_part} --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '1')} train_gpt.py {args}".rstrip()
    return f"python train_gpt.py {args}".rstrip()


def device_description(device: torch.device, world_size: int) -> str:
    if device.type == "cuda":
        return f"cuda: {world_size}x {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {cpu} ({os.cpu_count()} cores), {world_size} process(es)"


def nvidia_smi() -> str:
    if not shutil.which("nvidia-smi"):
        return "not available"
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "not available"
    return "\n" + "\n".join("  " + line for line in out.rstrip().splitlines())


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16/AMX); without it bf16 matmuls run ~70x slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compute_lines(cfg: Config, device: torch.device) -> list[str]:
    """The log's statement of what the run computes in, and a warning when bf16 will crawl on this CPU."""
    compute = resolve_dtype(cfg.model.compute_dtype, device)
    orthogonalize = resolve_dtype(cfg.optim.orthogonalize_dtype, device)
    native = cpu_has_native_bf16()
    lines = [f"compute: {str(compute).removeprefix('torch.')} (--compute-dtype {cfg.model.compute_dtype}), "
             f"orthogonalisation {str(orthogonalize).removeprefix('torch.')} "
             f"(--orthogonalize-dtype {cfg.optim.orthogonalize_dtype})",
             f"cpu: capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {'yes' if native else 'no'}"]
    if device.type == "cpu" and not native and torch.bfloat16 in (compute, orthogonalize):
        lines.append("warning: bfloat16 on a CPU without native bf16: its matmuls run ~70x slower than float32 "
                     "here; --compute-dtype float32 --orthogonalize-dtype float32 (the CPU default) avoids that")
    return lines


def write_log_header(log: RunLogger, cfg: Config, argv: list[str], world_size: int, device: torch.device) -> None:
    with open(os.path.abspath(__file__), "rb") as f:
        log.write_script(f.read())
    header = [
        f"run_id: {cfg.run.run_id}",
        f"command: {launch_command(argv)}",
        f"argv: {json.dumps(argv)}",
        f"world_size: {world_size}",
        f"python: {sys.version.split()[0]}",
        f"torch: {torch.__version__}",
        f"triton: {triton.__version__ if triton is not None else 'not installed'}",
        f"device: {device_description(device, world_size)}",
        *compute_lines(cfg, device),
        f"nvidia-smi: {nvidia_smi()}",
        f"config: {json.dumps(flat_config(cfg))}",
    ]
    for line in header:
        log(line, console=not line.startswith("config:"))


def matmul_flops_per_token(model: nn.Module, max_seq_len: int, long_window: int) -> float:
    """Training FLOPs per token: 6 per matrix weight (embedding lookups excluded), plus attention
    scores/values over the window."""
    cfg = model.cfg
    lookups = ("embed", "untied_embed", "value_embed", "bigram_embed")  # tables read by index, not multiplied
    matrix = sum(p.numel() for p in model.parameters() if p.ndim >= 2 and p.label not in lookups)
    attn_layers = sum(1 for c in cfg.window_pattern if c in "SL")
    mean_keys = min(long_window, max_seq_len) * 0.75 / 2  # mix of short and long windows, causal half
    return 6 * matrix + 12 * attn_layers * cfg.num_heads * cfg.head_dim * mean_keys


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of one device (no sparsity), or None when unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


# =============================================================================
# 8. Checkpoints
# =============================================================================
# One file per rank (optimiser state is sharded), written then renamed, so a killed
# run always leaves its last complete checkpoint behind.


def checkpoint_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank{rank}.pt")


def save_checkpoint(directory: str, rank: int, world_size: int, state: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    path = checkpoint_path(directory, rank)
    tmp = path + ".tmp"
    torch.save(dict(state, world_size=world_size), tmp)
    os.replace(tmp, path)


def load_checkpoint(directory: str, rank: int, world_size: int) -> dict:
    path = checkpoint_path(directory, rank)
    if not os.path.isfile(path):
        raise ConfigError(f"--resume {directory}: no checkpoint file {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["world_size"] != world_size:
        raise ConfigError(f"--resume {directory}: written by {state['world_size']} process(es), "
                          f"resumed with {world_size}; use the same world size")
    return state


# =============================================================================
# 9. Training loop and entry point
# =============================================================================


class TrainingDiverged(RuntimeError):
    pass


def resolve_device_type(device: str) -> str:
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


def setup_distributed(run: RunConfig) -> tuple[int, int, torch.device]:
    want_cuda = resolve_device_type(run.device) == "cuda"
    if run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        # A timeout makes surviving ranks exit instead of hanging when one rank dies.
        dist.init_process_group("nccl" if want_cuda else "gloo", device_id=device if want_cuda else None,
                                timeout=datetime.timedelta(seconds=run.dist_timeout_s))
    return rank, world_size, device


def all_reduce_mean(value: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world_size
    return value


def make_train_loader(cfg: Config, rank: int, world_size: int, device):
    data = cfg.data
    # With prefetching the loader builds host tensors in a thread and the wrapper moves them to the device.
    build_on = "cpu" if data.data_prefetch else device
    if data.data == "synthetic":
        loader = SyntheticLoader(rank, world_size, slices=data.batch_slices, max_seq_len=data.max_seq_len,
                                 bos_id=data.bos_id, vocab_size=cfg.model.vocab_size, seed=cfg.run.seed,
                                 device=build_on)
    elif data.data_stream == "contiguous":
        loader = ContiguousLoader(data.train_files, rank, world_size, slices=data.batch_slices,
                                  max_seq_len=data.max_seq_len, bos_id=data.bos_id, repeat=data.repeat_data,
                                  index_ahead=data.data_prefetch, device=build_on)
    else:
        loader = TrainLoader(data.train_files, rank, world_size, slices=data.batch_slices,
                             max_seq_len=data.max_seq_len, bos_id=data.bos_id, repeat=data.repeat_data,
                             long_documents=data.long_documents, index_ahead=data.data_prefetch, device=build_on)
    return PrefetchingLoader(loader, device) if data.data_prefetch else loader


def val_chunk_tokens(data: DataConfig) -> int:
    """Tokens per validation forward: the same at every world size (the record's per-GPU share on 8 GPUs)."""
    return data.val_batch_tokens // data.batch_slices


def train_micro_batch_tokens(cfg: Config) -> int:
    """The largest training micro-batch: validation computes its head and loss in pieces this long."""
    return max(*cfg.schedule.batch_tokens_stages, cfg.schedule.batch_tokens_extension) // cfg.data.batch_slices


def make_val_batches(cfg: Config, rank: int, world_size: int, device) -> list[MicroBatch]:
    """Validation chunks (one per forward), loaded once and reused at every evaluation."""
    data = cfg.data
    if data.data == "synthetic":
        loader = SyntheticLoader(rank, world_size, slices=data.batch_slices, max_seq_len=data.max_seq_len,
                                 bos_id=data.bos_id, vocab_size=cfg.model.vocab_size, seed=cfg.run.seed + 1_000_003,
                                 device=device)
        return [mb for _ in range(data.val_tokens // data.val_batch_tokens)
                for mb in loader.next_step(data.val_batch_tokens)]
    return list(validation_batches(data.val_files, rank, world_size, val_tokens=data.val_tokens,
                                   chunk_tokens=val_chunk_tokens(data), bos_id=data.bos_id, device=device))


def micro_batch_loss(model, mb: MicroBatch, windows: tuple[int, int], max_seqlen: int,
                     loss_piece: int = 0, target_weights: torch.Tensor | None = None,
                     prefix_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Summed loss of one micro-batch (target_weights: multi-token prediction; prefix_weight: the
    prefix-token loss; GPT.forward).

    max_seqlen must be a constant of the run (max_seq_len in training, the chunk length in
    validation): a compiled model guards on it, so a per-batch value would recompile. The number
    of sequences varies from batch to batch, so cu_seqlens is marked dynamic.
    """
    if mb.max_seqlen > max_seqlen:
        raise ValueError(f"a sequence of {mb.max_seqlen} tokens exceeds max_seqlen {max_seqlen}")
    torch._dynamo.maybe_mark_dynamic(mb.cu_seqlens, 0)
    return model(mb.inputs, mb.targets, mb.cu_seqlens, max_seqlen, windows, loss_piece, target_weights, prefix_weight)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[MicroBatch], windows: tuple[int, int], world_size: int,
             loss_piece: int = 0) -> float:
    """Mean per-token validation loss over all ranks' chunks (summed, then divided once)."""
    device = batches[0].inputs.device
    total = torch.zeros((), device=device, dtype=torch.float64)
    for mb in batches:
        total += micro_batch_loss(model, mb, windows, mb.inputs.numel(), loss_piece).double()
    sums = torch.stack([total, torch.tensor(float(sum(mb.inputs.numel() for mb in batches)), device=device,
                                            dtype=torch.float64)])
    if world_size > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return (sums[0] / sums[1]).item()


def train_step(model, optimizers: OptimizerSet, micro_batches: list[MicroBatch], plan: StepPlan,
               max_seqlen: int, reduction: str = "sum") -> torch.Tensor:
    """Forward/backward over this rank's micro-batches, then the optimiser step; returns the summed
    loss as a device tensor (not read here: reading it would wait for the GPU every step).
    reduction "mean" differentiates each micro-batch's mean token loss instead of its sum."""
    device = micro_batches[0].inputs.device
    loss_sum = torch.zeros((), device=device)
    # A tensor, so that the compiled model does not recompile as the weights change from step to step.
    weights = None if plan.target_weights is None else torch.tensor(plan.target_weights, device=device)
    prefix_weight = None if plan.prefix_weight is None else torch.tensor(plan.prefix_weight, device=device)
    for i, mb in enumerate(micro_batches):
        optimizers.prepare_backward(plan.step, last_micro_step=i == len(micro_batches) - 1)
        loss = micro_batch_loss(model, mb, plan.windows, max_seqlen, target_weights=weights, prefix_weight=prefix_weight)
        # Dividing by the micro-step count while the optimisers average over ranks makes the
        # gradient the same for every world size (the global mean under "mean": slices are equal).
        tokens = mb.targets.numel() if reduction == "mean" else 1
        (loss / (len(micro_batches) * tokens)).backward()
        loss_sum += loss.detach()
    optimizers.step(plan.step, plan.lr_multiplier, plan.momentum)
    model.after_optimizer_step(plan.step)
    return loss_sum


def apply_transitions(plan: StepPlan, raw_model: GPT, optimizers: OptimizerSet, scalar_pause_steps: int) -> None:
    """The schedule's events at this step, before it trains."""
    if plan.window_grew_from is not None:
        raw_model.rescale_rotary(plan.window_grew_from, plan.windows[0])
    if plan.stage_changed:
        optimizers.pause_scalars(scalar_pause_steps)
    if plan.untie_embedding:
        untie_embedding(raw_model, optimizers)


def untie_embedding(raw_model: GPT, optimizers: OptimizerSet) -> None:
    """The input embedding leaves the head: its own table and Adam state start as copies of the head's."""
    raw_model.untie_embedding()
    optimizers.copy_adam_state(raw_model.lm_head, raw_model.untied_embed)


def warm_up(model, raw_model, optimizers, loader, schedule: Schedule, cfg: Config, val_batches) -> None:
    """Compile and run every batch/window shape of the schedule and every validation window,
    then restore all state exactly. Warm-up steps are numbered 0, 1, 2, ... so the optimisers'
    cadence (Adam every other step) is exercised as in training."""
    saved_model = copy.deepcopy(raw_model.state_dict())
    saved_opt = copy.deepcopy(optimizers.state_dict())
    saved_loader = copy.deepcopy(loader.state_dict())
    shape_steps = schedule.shape_steps()
    per_shape = max(1, cfg.loop.warmup_steps // max(1, len(shape_steps)))
    step = 0
    for first in shape_steps:
        shape = schedule.at(first)
        if schedule.untied_at(first) and not raw_model.embedding_untied:
            untie_embedding(raw_model, optimizers)
        for _ in range(per_shape):
            plan = dataclasses.replace(schedule.at(step), batch_tokens=shape.batch_tokens, windows=shape.windows,
                                       target_weights=shape.target_weights, max_seq_len=shape.max_seq_len,
                                       prefix_weight=shape.prefix_weight)
            train_step(model, optimizers, loader.next_step(plan.batch_tokens, plan.max_seq_len), plan,
                       plan.max_seq_len, cfg.loop.train_loss_reduction)
            step += 1
    for windows in schedule.all_val_windows(cfg.loop.val_every):
        evaluate(model, val_batches[:1], windows, 1, train_micro_batch_tokens(cfg))
    raw_model.load_state_dict(saved_model)
    optimizers.load_state_dict(saved_opt)
    loader.load_state_dict(saved_loader)


def compiled_graph_count() -> int:
    """Graphs torch.compile has built in this process (every recompile adds one)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


class TrainClock:
    """Training time in ms: runs while training, stops for validation and checkpoints. The host
    clock runs ahead of the GPU unless synchronised, so readings are exact only after stop()."""

    def __init__(self, sync, elapsed_ms: float = 0.0):
        self.sync, self.total_ms, self.started = sync, elapsed_ms, None

    def start(self) -> None:
        self.sync()
        self.started = time.perf_counter()

    def stop(self) -> float:
        self.sync()
        self.total_ms = self.elapsed_ms()
        self.started = None
        return self.total_ms

    def elapsed_ms(self) -> float:
        running = 0.0 if self.started is None else 1000 * (time.perf_counter() - self.started)
        return self.total_ms + running


def train(cfg: Config, argv: list[str] | None = None) -> dict:
    """Run one training job (cfg from build_config or config_from_args); returns the final metrics."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rank, world_size, device = setup_distributed(cfg.run)
    check_world_size(cfg, world_size)
    if not cfg.run.run_id:
        run_id = [f"{time.strftime('%Y%m%d_%H%M%S')}_{cfg.run.preset}_s{cfg.run.seed}"]
        if world_size > 1:
            dist.broadcast_object_list(run_id, src=0)
        cfg.run.run_id = run_id[0]
    torch.manual_seed(cfg.run.seed)
    # Data first: a bad shard is reported before any model is built.
    loader = make_train_loader(cfg, rank, world_size, device)
    val_batches = make_val_batches(cfg, rank, world_size, device)

    log = RunLogger(os.path.join(cfg.run.log_dir, f"{cfg.run.run_id}.txt") if rank == 0 else None, echo=rank == 0)
    try:
        write_log_header(log, cfg, argv, world_size, device)
        for line in loader.describe():
            log(line)
        return TrainingRun(cfg, log, loader, val_batches, rank, world_size, device).run()
    except BaseException as e:
        log(f"error: {type(e).__name__}: {e}".splitlines()[0])
        raise
    finally:
        loader.close()
        log.close()


class TrainingRun:
    """One run's model, optimisers, schedule and clock; `run()` is the loop."""

    def __init__(self, cfg: Config, log: RunLogger, loader, val_batches, rank: int, world_size: int,
                 device: torch.device):
        self.cfg, self.log, self.loader, self.val_batches = cfg, log, loader, val_batches
        self.rank, self.world_size, self.device = rank, world_size, device
        self.schedule = Schedule.of(cfg)
        self.raw_model = GPT(cfg.model, device)
        self.model = self.raw_model
        self.compiled = cfg.run.compile and (device.type == "cuda" or cfg.run.compile_cpu)
        if self.compiled:
            # Each window size and batch shape is its own graph (the warm-up compiles them all).
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.model = torch.compile(self.raw_model, dynamic=False, backend=cfg.run.compile_backend)
        self.optimizers = OptimizerSet(self.raw_model, cfg.optim, rank, world_size,
                                       schedule_steps=cfg.schedule.num_iterations, launch_from_hooks=not self.compiled)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.peak = peak_flops(device)
        self.start_step, resumed_ms = 0, 0.0
        if cfg.loop.resume:
            state = load_checkpoint(cfg.loop.resume, rank, world_size)
            self.raw_model.load_state_dict(state["model"])
            self.optimizers.load_state_dict(state["optimizers"])
            loader.load_state_dict(state["loader"])
            torch.set_rng_state(state["rng"])
            self.start_step, resumed_ms = state["step"], state["train_time_ms"]
            log(f"resumed from {cfg.loop.resume} at step {self.start_step}")
        self.clock = TrainClock(self.sync, resumed_ms)
        # Work done so far, for tokens/s and MFU over the whole run: batch sizes and windows change by stage.
        self.tokens_trained, self.flops_trained, self.flops_per_token = 0, 0.0, {}
        for step in range(self.start_step):
            self.count_work(self.schedule.at(step))

    def run(self) -> dict:
        cfg, steps = self.cfg, self.schedule.total_steps
        if cfg.loop.warmup_steps > 0:
            t = time.perf_counter()
            warm_up(self.model, self.raw_model, self.optimizers, self.loader, self.schedule, cfg, self.val_batches)
            self.log(f"warmup: {cfg.loop.warmup_steps} untimed steps in {time.perf_counter() - t:.1f}s, state restored")
        graphs_after_warmup = compiled_graph_count()
        val_loss = float("nan")
        self.clock.start()
        for step in range(self.start_step, steps + 1):
            plan = self.schedule.at(step) if step < steps else None
            if plan is not None:  # before a validation at this step, as the records (it then sees the new YaRN)
                apply_transitions(plan, self.raw_model, self.optimizers, cfg.schedule.scalar_pause_steps)
            if step == steps or (cfg.loop.val_every > 0 and step % cfg.loop.val_every == 0):
                val_loss = self.validate(step)
            if step == steps:
                break
            loss_sum = train_step(self.model, self.optimizers, self.loader.next_step(plan.batch_tokens, plan.max_seq_len),
                                  plan, plan.max_seq_len, cfg.loop.train_loss_reduction)
            self.count_work(plan)
            self.log_step(plan, loss_sum)
            done = step + 1
            if cfg.loop.checkpoint_every > 0 and done % cfg.loop.checkpoint_every == 0 and done < steps:
                self.save_checkpoint(done)

        if self.device.type == "cuda":
            self.log(f"peak memory: allocated {torch.cuda.max_memory_allocated(self.device) // 2**20} MiB, "
                     f"reserved {torch.cuda.max_memory_reserved(self.device) // 2**20} MiB")
        result = {"val_loss": val_loss, "train_time_ms": self.clock.total_ms, "steps": steps,
                  "run_id": cfg.run.run_id}
        if self.compiled:
            result["recompiles_after_warmup"] = compiled_graph_count() - graphs_after_warmup
            self.log(f"compile: {graphs_after_warmup} graphs compiled before the timed loop, "
                     f"{result['recompiles_after_warmup']} after")
        self.log(f"final: val_loss:{val_loss:.4f} train_time_ms:{self.clock.total_ms:.0f} steps:{steps}")
        return result

    def validate(self, step: int) -> float:
        """Validation before `step` (the clock stops meanwhile); logs and returns the loss."""
        train_time_ms = self.clock.stop()
        val_loss = evaluate(self.model, self.val_batches, self.schedule.val_windows(step), self.world_size,
                            train_micro_batch_tokens(self.cfg))
        if not math.isfinite(val_loss):
            raise TrainingDiverged(f"validation loss is {val_loss} at step {step}")
        self.log(f"step:{step}/{self.schedule.total_steps} val_loss:{val_loss:.4f} train_time:{train_time_ms:.0f}ms "
                 f"step_avg:{train_time_ms / max(step, 1):.2f}ms")  # a resumed run's time includes the steps before
        self.clock.start()
        return val_loss

    def count_work(self, plan: StepPlan) -> None:
        window = plan.windows[0]
        if window not in self.flops_per_token:
            self.flops_per_token[window] = matmul_flops_per_token(self.raw_model, self.cfg.data.max_seq_len, window)
        self.tokens_trained += plan.batch_tokens
        self.flops_trained += plan.batch_tokens * self.flops_per_token[window]

    def log_step(self, plan: StepPlan, loss_sum: torch.Tensor) -> None:
        loop, steps, done = self.cfg.loop, self.schedule.total_steps, plan.step + 1
        if loop.log_every <= 0 or (done % loop.log_every and done != steps):
            return
        loss_text = ""
        if loop.train_loss_every > 0 and (done % loop.train_loss_every == 0 or done == steps):
            # The only per-step read of a device value: it waits for this step to finish.
            train_loss = all_reduce_mean(loss_sum / (plan.batch_tokens // self.world_size), self.world_size).item()
            if not math.isfinite(train_loss):
                raise TrainingDiverged(f"training loss is {train_loss} at step {done}; stopping (log kept)")
            loss_text = f"train_loss:{train_loss:.4f} "
        elapsed_ms = self.clock.elapsed_ms()
        step_avg = elapsed_ms / done
        line = (f"step:{done}/{steps} train_time:{elapsed_ms:.0f}ms step_avg:{step_avg:.2f}ms "
                f"{loss_text}eta:{step_avg * (steps - done) / 1000:.0f}s")
        if self.peak is not None:  # over the run so far, like step_avg
            seconds = elapsed_ms / 1000
            mfu = 100 * self.flops_trained / seconds / (self.peak * self.world_size)
            line += f" tokens/s:{self.tokens_trained / seconds:.0f} mfu:{mfu:.1f}%"
        self.log(line)

    def save_checkpoint(self, done: int) -> None:
        directory = os.path.join(self.cfg.loop.checkpoint_dir, self.cfg.run.run_id, f"step_{done:06d}")
        self.sync()
        save_checkpoint(directory, self.rank, self.world_size, {
            "model": self.raw_model.state_dict(), "optimizers": self.optimizers.state_dict(),
            "loader": self.loader.state_dict(), "rng": torch.get_rng_state(), "step": done,
            "train_time_ms": self.clock.elapsed_ms()})
        self.log(f"checkpoint: {directory}", console=False)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        train(config_from_args(argv), argv)
        if dist.is_initialized():
            # Leave together: a gloo rank whose peer has already closed its sockets can abort.
            dist.barrier()
    except (DataError, ConfigError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, TrainingDiverged) else 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
