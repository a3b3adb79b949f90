"""Download FineWeb GPT-2-token shards from the Hugging Face hub.

    python data/cached_fineweb10B.py [K]

Fetches the validation shard and the first K training shards (default 9, 900M tokens,
enough for the short track; 103 exist) into data/fineweb10B/. Files already complete are
skipped, so an interrupted download can simply be run again.
"""

import os
import sys

REPO_ID = "kjj0/fineweb10B-gpt2"
NUM_TRAIN_SHARDS = 103
SHARD_BYTES = 1024 + 2 * 100_000_000  # header + 100M uint16 tokens; the val shard is the same size
LOCAL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fineweb10B")


def shard_names(num_train: int) -> list[str]:
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_train + 1)]


def is_complete(path: str) -> bool:
    return os.path.exists(path) and os.path.getsize(path) == SHARD_BYTES


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and not argv[0].isdigit()):
        print("usage: python data/cached_fineweb10B.py [K]   (K = number of train shards, 1..103, default 9)")
        return 2
    num_train = int(argv[0]) if argv else 9
    if not 1 <= num_train <= NUM_TRAIN_SHARDS:
        print(f"error: K={num_train} out of range; the dataset has {NUM_TRAIN_SHARDS} train shards")
        return 2
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        print("error: huggingface_hub is not installed; run `pip install -r requirements.txt`")
        return 1
    os.makedirs(LOCAL_DIR, exist_ok=True)
    for name in shard_names(num_train):
        if is_complete(os.path.join(LOCAL_DIR, name)):
            print(f"{name}: already complete, skipped")
            continue
        try:
            hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset", local_dir=LOCAL_DIR)
        except Exception as e:  # network and hub errors come in many types; all mean the same to the user
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: downloading {name} from hub dataset {REPO_ID} failed ({type(e).__name__}: {reason}); "
                  "check the internet connection and run the same command again to resume")
            return 1
    print(f"done: {num_train} train shard(s) and the val shard in {LOCAL_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
