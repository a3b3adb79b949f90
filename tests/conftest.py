import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# GPT-2 BPE files under tiktoken's cache names, so tiktoken works offline.
_cache = os.path.join(os.path.dirname(REPO), "shared", "tiktoken_cache")
if os.path.isdir(_cache):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", _cache)
