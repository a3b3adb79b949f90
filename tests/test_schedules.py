import pytest

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
    assert tg.muon_momentum_at(0, short) == pytest.approx(0.85)
    assert tg.muon_momentum_at(150, short) == pytest.approx(0.90)
    assert tg.muon_momentum_at(300, short) == pytest.approx(0.95)
    assert tg.muon_momentum_at(1910, short) == pytest.approx(0.95)
    assert tg.muon_momentum_at(1935, short) == pytest.approx(0.90)
    assert tg.muon_momentum_at(1960, short) == pytest.approx(0.85)
    assert tg.muon_momentum_at(1999, short) == pytest.approx(0.85)


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
