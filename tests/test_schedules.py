import pytest
import torch

import train_gpt as tg


@pytest.fixture
def short():
    return tg.config_from_args(["--preset", "short"])


def test_short_batch_and_window_stages(short):
    # Stage index = int(3*step/1960): boundaries at 654, 1307 and 1960 (SPEC §3).
    expected = {0: (131_072, 3), 653: (131_072, 3), 654: (262_144, 7), 1306: (262_144, 7),
                1307: (393_216, 11), 1959: (393_216, 11), 1960: (393_216, 13), 1999: (393_216, 13)}
    for step, (tokens, blocks) in expected.items():
        assert tg.batch_tokens_at(step, short) == tokens, step
        assert tg.long_window_at(step, short) == blocks * 128, step
    assert tg.total_steps(short) == 2000


def test_short_lr_schedule_is_not_monotone(short):
    assert tg.lr_multiplier_at(0, short) == 1.0
    assert tg.lr_multiplier_at(653, short) == 1.0
    assert tg.lr_multiplier_at(654, short) == 1.51
    assert tg.lr_multiplier_at(882, short) == pytest.approx(1.51)  # cooldown starts at x = 0.45
    x = 1000 / 1960
    w = (1 - x) / 0.55
    assert tg.lr_multiplier_at(1000, short) == pytest.approx(1.51 * w + 0.1 * (1 - w))
    x = 1307 / 1960
    w = (1 - x) / 0.55
    assert tg.lr_multiplier_at(1307, short) == pytest.approx(1.93 * w + 0.1 * (1 - w))
    assert tg.lr_multiplier_at(1307, short) > tg.lr_multiplier_at(1306, short)  # jumps up
    assert tg.lr_multiplier_at(1960, short) == 0.1 and tg.lr_multiplier_at(1999, short) == 0.1


def test_short_muon_momentum(short):
    """Warm-up over the first 300 steps; cool-down over the last 50 of all 2000 (1950 -> 2000,
    extension included): 0.95 - 0.1 * (step - 1950) / 50."""
    assert tg.muon_momentum_at(0, short) == pytest.approx(0.85)
    assert tg.muon_momentum_at(150, short) == pytest.approx(0.90)
    assert tg.muon_momentum_at(300, short) == pytest.approx(0.95)
    assert tg.muon_momentum_at(1910, short) == pytest.approx(0.95)
    assert tg.muon_momentum_at(1949, short) == pytest.approx(0.95)
    assert tg.muon_momentum_at(1950, short) == pytest.approx(0.95)
    assert tg.muon_momentum_at(1960, short) == pytest.approx(0.95 - 0.1 * 10 / 50)
    assert tg.muon_momentum_at(1975, short) == pytest.approx(0.90)
    assert tg.muon_momentum_at(1999, short) == pytest.approx(0.95 - 0.1 * 49 / 50)  # 0.852


def keys_seen(window, granularity_block=0, query=5000):
    """Keys a query deep inside one long document may attend to, counted from the mask predicate."""
    k = torch.arange(query + 1)
    allowed = tg.attention_mask_allows(torch.tensor(query), k, 0, 0, window, granularity_block)
    return int(allowed.sum())


def test_short_window_key_counts_at_every_stage_and_final_validation(short):
    """Short = floor(long_blocks / 2) blocks; a window of w tokens shows w + 1 keys (the query and
    the w before it); final validation: long 20 blocks, short stays at 6."""
    expected = {0: (3, 1), 654: (7, 3), 1307: (11, 5), 1960: (13, 6)}
    for step, (long_blocks, short_blocks) in expected.items():
        long_window = tg.long_window_at(step, short)
        short_window = tg.short_window_for(long_window, short)
        assert (long_window, short_window) == (long_blocks * 128, short_blocks * 128), step
        assert (keys_seen(long_window), keys_seen(short_window)) == (long_blocks * 128 + 1, short_blocks * 128 + 1)
    assert tg.final_val_windows(short) == (20 * 128, 6 * 128)
    assert [keys_seen(w) for w in tg.final_val_windows(short)] == [2561, 769]


def test_medium_short_window_is_half_the_blocks_rounded_down():
    medium = tg.config_from_args(["--preset", "medium"])
    odd = next(s for s in range(5590) if tg.long_window_at(s, medium) // 128 % 2 == 1)
    long_blocks = tg.long_window_at(odd, medium) // 128
    assert tg.short_window_for(long_blocks * 128, medium) == (long_blocks // 2) * 128
    assert tg.final_val_windows(medium) == (3456, 1664)  # 27 and 13 blocks
    # Block granularity: a query sees whole blocks b-n+1 .. b, so the key count depends on where it sits.
    assert keys_seen(3 * 128, 128, query=5 * 128) == 2 * 128 + 1  # first token of its block
    assert keys_seen(3 * 128, 128, query=6 * 128 - 1) == 3 * 128  # last token of its block


def test_medium_cubic_window_and_linear_cooldown():
    medium = tg.config_from_args(["--preset", "medium"])
    for step in (0, 1000, 2795, 4000, 5589):
        x = step / 5590
        tokens = 3456 * (4 * x**3 - 6 * x**2 + 3 * x)
        expected = max(128, -(-tokens // 128) * 128)
        assert tg.long_window_at(step, medium) == expected
    assert tg.long_window_at(5590, medium) == 3456
    assert tg.batch_tokens_at(3000, medium) == 524_288
    assert tg.lr_multiplier_at(1677, medium) == 1.0  # flat for 30%
    x = 4000 / 5590
    w = (1 - x) / 0.7
    assert tg.lr_multiplier_at(4000, medium) == pytest.approx(w + 0.01 * (1 - w))


# --- command line -------------------------------------------------------------------

def test_overrides_and_types():
    cfg = tg.config_from_args(["--preset", "test", "--seed", "7", "--val_every", "3", "--compile", "false",
                               "--batch-tokens-stages", "64,128,256", "--target-val-loss", "4.5"])
    assert cfg.preset == "test" and cfg.seed == 7 and cfg.val_every == 3 and cfg.compile is False
    assert cfg.batch_tokens_stages == (64, 128, 256) and cfg.target_val_loss == 4.5


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--num-layerz", "3"], "unknown option '--num-layerz'"),
    (["--seed", "x"], "--seed expects int"),
])
def test_bad_command_lines_are_one_line_errors(argv, message, capsys):
    with pytest.raises(tg.ConfigError) as err:
        tg.config_from_args(argv)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_unknown_option_lists_valid_fields():
    with pytest.raises(tg.ConfigError) as err:
        tg.config_from_args(["--bogus", "1"])
    assert "num_iterations" in str(err.value)


@pytest.mark.parametrize("override, message", [
    ({"batch_slices": 3}, "not divisible by the world size 2"),
    ({"batch_tokens_stages": (101, 200, 300)}, "not divisible into --batch-slices"),
    ({"val_tokens": 1000}, "must be a multiple of --val-batch-tokens"),
    ({"data": "imagenet"}, "--data 'imagenet'"),
])
def test_bad_config_values(override, message):
    cfg = tg.config_from_args(["--preset", "test"])
    for k, v in override.items():
        setattr(cfg, k, v)
    with pytest.raises(tg.ConfigError, match=message.replace("(", r"\(")):
        tg.check_config(cfg, world_size=2)
