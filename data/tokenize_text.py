"""Tokenise UTF-8 text files into training shards (GPT-2 BPE via tiktoken).

    python data/tokenize_text.py --out DIR --name NAME [--val-tokens N] [--split-paragraphs] FILE...

Every document (each input file, or each blank-line-separated paragraph with
--split-paragraphs) is preceded by token 50256 (<|endoftext|>, the BOS). The first N
tokens go to NAME_val_000000.bin (default: 10% of the data), the rest to
NAME_train_000001.bin, NAME_train_000002.bin, ... (at most 100M tokens per shard).
"""

import argparse
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train_gpt import preset_config, write_shard  # noqa: E402  (one shard writer for the whole repository)

BOS = 50256
MAX_SHARD_TOKENS = 100_000_000


def read_documents(paths: list[str], split_paragraphs: bool) -> list[str]:
    docs = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: cannot read {path} as UTF-8 text ({e})") from None
        if split_paragraphs:
            docs.extend(p.strip() for p in re.split(r"\n\s*\n", text) if p.strip())
        elif text.strip():
            docs.append(text)
    return docs


def tokenize(docs: list[str]) -> np.ndarray:
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    out = []
    for ids in enc.encode_ordinary_batch(docs):
        out.append(BOS)
        out.extend(ids)
    return np.array(out, dtype=np.uint16)


def length_report(tokens: np.ndarray, split_paragraphs: bool) -> list[str]:
    """Document-length distribution, and a hint when most documents exceed the cpu preset's sequence limit."""
    starts = np.flatnonzero(tokens == BOS)
    lengths = np.diff(np.append(starts, len(tokens)))
    limit = preset_config("cpu").data.max_seq_len
    longer = int((lengths > limit).sum())
    lines = [f"document lengths (tokens, BOS included): count {len(lengths):,}, median {int(np.median(lengths)):,}, "
             f"max {int(lengths.max()):,}; {longer:,} longer than {limit} (the cpu preset's max_seq_len)"]
    if longer > len(lengths) / 2 and not split_paragraphs:
        lines.append(f"hint: most documents are longer than {limit} tokens; --split-paragraphs makes each "
                     "blank-line-separated paragraph its own document (training with --long-documents continue "
                     "also uses every token)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--name", required=True, help="shard name prefix, e.g. fineweb or tinyshakespeare")
    parser.add_argument("--val-tokens", type=int, default=None, help="tokens in the val shard (default 10%%)")
    parser.add_argument("--split-paragraphs", action="store_true", help="one document per blank-line-separated paragraph")
    args = parser.parse_args(argv)
    docs = read_documents(args.files, args.split_paragraphs)
    if not docs:
        raise SystemExit("error: the input files hold no text")
    tokens = tokenize(docs)
    val_tokens = len(tokens) // 10 if args.val_tokens is None else args.val_tokens
    if not 0 < val_tokens < len(tokens):
        raise SystemExit(f"error: --val-tokens {val_tokens} must be between 1 and {len(tokens) - 1} "
                         f"(the data has {len(tokens)} tokens)")
    os.makedirs(args.out, exist_ok=True)
    val_path = os.path.join(args.out, f"{args.name}_val_000000.bin")
    write_shard(val_path, tokens[:val_tokens])
    print(f"{val_path}: {val_tokens:,} tokens")
    train = tokens[val_tokens:]
    for i, start in enumerate(range(0, len(train), MAX_SHARD_TOKENS), start=1):
        path = os.path.join(args.out, f"{args.name}_train_{i:06d}.bin")
        chunk = train[start:start + MAX_SHARD_TOKENS]
        write_shard(path, chunk)
        print(f"{path}: {len(chunk):,} tokens")
    print(f"total: {len(tokens):,} tokens in {len(docs):,} documents")
    for line in length_report(tokens, args.split_paragraphs):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
