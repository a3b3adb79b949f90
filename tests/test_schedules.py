import pytest
import torch

import train_gpt as tg


@pytest.fixture
def short():
    return tg.Schedule.of(tg.config_from_args(["--preset", "short"]))


def test_short_batch_and_window_stages(short):
    # Stage index = int(3*step/1960): boundaries at 654, 1307 and 1960, as in the record.
    expected = {0: (131_072, 3), 653: (131_072, 3), 654: (262_144, 7), 1306: (262_144, 7),
                1307: (393_216, 11), 1959: (393_216, 11), 1960: (393_216, 13), 1999: (393_216, 13)}
    for step, (tokens, blocks) in expected.items():
        assert short.batch_tokens(step) == tokens, step
        assert short.long_window(step) == blocks * 128, step
    assert short.total_steps == 2000


def test_short_lr_schedule_is_not_monotone(short):
    assert short.lr_multiplier(0) == 1.0
    assert short.lr_multiplier(653) == 1.0
    assert short.lr_multiplier(654) == 1.51
    assert short.lr_multiplier(882) == pytest.approx(1.51)  # cooldown starts at x = 0.45
    x = 1000 / 1960
    w = (1 - x) / 0.55
    assert short.lr_multiplier(1000) == pytest.approx(1.51 * w + 0.1 * (1 - w))
    x = 1307 / 1960
    w = (1 - x) / 0.55
    assert short.lr_multiplier(1307) == pytest.approx(1.93 * w + 0.1 * (1 - w))
    assert short.lr_multiplier(1307) > short.lr_multiplier(1306)  # jumps up
    assert short.lr_multiplier(1960) == 0.1 and short.lr_multiplier(1999) == 0.1


def test_short_muon_momentum(short):
    """Warm-up over the first 300 steps; cool-down over the last 50 of all 2000 (1950 -> 2000,
    extension included): 0.95 - 0.1 * (step - 1950) / 50."""
    assert short.momentum(0) == pytest.approx(0.85)
    assert short.momentum(150) == pytest.approx(0.90)
    assert short.momentum(300) == pytest.approx(0.95)
    assert short.momentum(1910) == pytest.approx(0.95)
    assert short.momentum(1949) == pytest.approx(0.95)
    assert short.momentum(1950) == pytest.approx(0.95)
    assert short.momentum(1960) == pytest.approx(0.95 - 0.1 * 10 / 50)
    assert short.momentum(1975) == pytest.approx(0.90)
    assert short.momentum(1999) == pytest.approx(0.95 - 0.1 * 49 / 50)  # 0.852


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
        long_window = short.long_window(step)
        short_window = short.short_window(long_window)
        assert (long_window, short_window) == (long_blocks * 128, short_blocks * 128), step
        assert (keys_seen(long_window), keys_seen(short_window)) == (long_blocks * 128 + 1, short_blocks * 128 + 1)
    assert short.final_val_windows() == (20 * 128, 6 * 128)
    assert [keys_seen(w) for w in short.final_val_windows()] == [2561, 769]


def test_medium_short_window_is_half_the_blocks_rounded_down():
    medium = tg.Schedule.of(tg.config_from_args(["--preset", "medium"]))
    odd = next(s for s in range(5590) if medium.long_window(s) // 128 % 2 == 1)
    long_blocks = medium.long_window(odd) // 128
    assert medium.short_window(long_blocks * 128) == (long_blocks // 2) * 128
    assert medium.final_val_windows() == (3456, 1664)  # 27 and 13 blocks
    # Block granularity: a query sees whole blocks b-n+1 .. b, so the key count depends on where it sits.
    assert keys_seen(3 * 128, 128, query=5 * 128) == 2 * 128 + 1  # first token of its block
    assert keys_seen(3 * 128, 128, query=6 * 128 - 1) == 3 * 128  # last token of its block


def test_medium_cubic_window_and_linear_cooldown():
    medium = tg.Schedule.of(tg.config_from_args(["--preset", "medium"]))
    for step in (0, 1000, 2795, 4000, 5589):
        x = step / 5590
        tokens = 3456 * (4 * x**3 - 6 * x**2 + 3 * x)
        expected = max(128, -(-tokens // 128) * 128)
        assert medium.long_window(step) == expected
    assert medium.long_window(5590) == 3456
    assert medium.batch_tokens(3000) == 524_288
    assert medium.lr_multiplier(1677) == 1.0  # flat for 30%
    x = 4000 / 5590
    w = (1 - x) / 0.7
    assert medium.lr_multiplier(4000) == pytest.approx(w + 0.01 * (1 - w))


# --- command line -------------------------------------------------------------------

def test_overrides_and_types():
    cfg = tg.config_from_args(["--preset", "test", "--seed", "7", "--val_every", "3", "--compile", "false",
                               "--batch-tokens-stages", "64,128,256", "--target-val-loss", "4.5"])
    assert cfg.run.preset == "test" and cfg.run.seed == 7 and cfg.loop.val_every == 3 and cfg.run.compile is False
    assert cfg.schedule.batch_tokens_stages == (64, 128, 256) and cfg.run.target_val_loss == 4.5


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
    ({"batch_tokens_stages": (101, 200, 300)}, "batch of 101 tokens is not divisible into --batch-slices 2"),
    ({"val_tokens": 1000}, "--val-tokens 1000 must be a multiple of --val-batch-tokens"),
    ({"data": "imagenet"}, "--data 'imagenet': choose one of fineweb, synthetic"),
    ({"long_documents": "wrap"}, "--long-documents 'wrap': choose one of truncate, continue"),
    ({"adam_every": 0}, "--adam-every 0: must be >= 1"),
    ({"num_iterations": 0}, "--num-iterations 0: must be > 0"),
    ({"lr_stage_multipliers": ()}, "--lr-stage-multipliers (): expects at least one"),
])
def test_bad_config_values(override, message):
    with pytest.raises(tg.ConfigError) as info:
        tg.build_config("test", **override)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_world_size_is_checked_where_it_is_known():
    cfg = tg.config_from_args(["--preset", "test", "--batch-slices", "3", "--batch-tokens-stages", "3,6,6",
                               "--batch-tokens-extension", "6", "--val-batch-tokens", "1023", "--val-tokens", "2046"])
    tg.check_world_size(cfg, 1)
    tg.check_world_size(cfg, 3)
    with pytest.raises(tg.ConfigError, match="--batch-slices 3 is not divisible by the world size 2"):
        tg.check_world_size(cfg, 2)


def test_every_setting_is_a_flag_of_exactly_one_group():
    owners = {}
    for group, cls in tg.CONFIG_GROUPS.items():
        for f in tg.fields(cls):
            assert f.name not in owners, (f.name, owners.get(f.name), group)
            owners[f.name] = group
    assert set(owners) == set(tg.CONFIG_FIELDS)
    flat = tg.flat_config(tg.config_from_args(["--preset", "medium"]))
    assert list(flat) == list(owners) and flat["target_val_loss"] == 2.92  # the log's config line


def test_schedule_events_match_the_windows_and_stages(short):
    """YaRN at every step the long window grows, the scalar pause at every stage change, nothing else."""
    grew = {s: short.at(s).window_grew_from for s in range(short.total_steps) if short.at(s).window_grew_from}
    assert grew == {654: 384, 1307: 896, 1960: 1408}
    assert [s for s in range(short.total_steps) if short.at(s).stage_changed] == [654, 1307, 1960]
    plan = short.at(1999)
    assert (plan.batch_tokens, plan.windows, plan.lr_multiplier) == (393_216, (13 * 128, 6 * 128), 0.1)
    assert short.val_windows(0) == short.windows(0) and short.val_windows(654) == short.windows(654)
    assert short.windows(654) != short.windows(653)  # a stage boundary: the validation sees the new windows
    assert short.val_windows(2000) == short.final_val_windows()
