"""``[shutdown]`` drain settings: defaults (as the example file documents them), and a bad value
names its key and says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import BrokerConfig, load_config
from broker.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "broker.example.toml"


def test_defaults_and_the_example_agree(tmp_path: Path) -> None:
    s = BrokerConfig(state_dir=tmp_path).shutdown
    assert (s.drain_accept_seconds, s.drain_seconds, s.grace_seconds) == (5.0, 3600.0, 30.0)
    assert load_config(EXAMPLE).shutdown == s
    text = EXAMPLE.read_text()
    assert "# drain_accept_seconds = 5\n" in text and "# drain_seconds = 3600\n" in text


def test_values_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('state_dir = "."\n[shutdown]\ndrain_accept_seconds = 0\n'
                    "drain_seconds = 0.5\n")
    s = load_config(path).shutdown
    assert (s.drain_accept_seconds, s.drain_seconds) == (0, 0.5)


@pytest.mark.parametrize(("lines", "message"), [
    ("drain_seconds = 0", "key 'shutdown.drain_seconds': Input should be greater than 0"),
    ("drain_seconds = -5", "key 'shutdown.drain_seconds': Input should be greater than 0"),
    ("drain_seconds = 999999999", "key 'shutdown.drain_seconds': Input should be less than or "
                                  "equal to 604800"),
    ("drain_seconds = '1h'", "key 'shutdown.drain_seconds': Input should be a valid number"),
    ("drain_accept_seconds = -1", "key 'shutdown.drain_accept_seconds': Input should be greater "
                                  "than or equal to 0"),
    ("drain_accept_seconds = 601", "key 'shutdown.drain_accept_seconds'"),
    ("drain_acept_seconds = 5", "key 'shutdown.drain_acept_seconds'"),
    ("drain_accept_seconds = 60\ndrain_seconds = 30",
     "drain_accept_seconds (60) must not exceed drain_seconds (30): the listener must close "
     "before the drain's deadline"),
])
def test_a_bad_value_is_refused_with_its_key_and_reason(tmp_path: Path, lines: str,
                                                        message: str) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(f'state_dir = "."\n[shutdown]\n{lines}\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)
