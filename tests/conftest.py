import os
import socket
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# GPT-2 BPE files under tiktoken's cache names, so tiktoken works offline.
_cache = os.path.join(os.path.dirname(REPO), "shared", "tiktoken_cache")
if os.path.isdir(_cache):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", _cache)

import torch.nn as nn  # noqa: E402

import train_gpt as tg  # noqa: E402  (after the path is set)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def optimizer_set(model, cfg, rank=0, world_size=1, **kwargs):
    """The run's OptimizerSet for a whole Config, as the training loop builds it."""
    return tg.OptimizerSet(model, cfg.optim, rank, world_size, schedule_steps=cfg.schedule.num_iterations, **kwargs)


def with_short(model_cfg, long_window: int) -> tuple[int, int]:
    """(long, short) windows with the schedule's rule for the short one."""
    return long_window, tg.Schedule(tg.ScheduleConfig(), model_cfg.window_block).short_window(long_window)


def labelled(tensor, label):
    """A parameter with an optimiser label, as the model makes them."""
    p = nn.Parameter(tensor)
    p.label = label
    return p


class Bag(nn.Module):
    """A module holding the given parameters, for optimiser tests."""

    def __init__(self, **params):
        super().__init__()
        for name, p in params.items():
            setattr(self, name, p)
