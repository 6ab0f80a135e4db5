"""``[diag]``: off and on loopback unless configured; the app counts nothing while it is off."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.app import _metrics
from broker.config import BrokerConfig, load_config
from broker.diag.metrics import PrometheusMetrics
from broker.errors import ConfigError
from broker.ports import NullMetrics

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "broker.example.toml"


def test_off_and_on_loopback_by_default(tmp_path: Path) -> None:
    cfg = BrokerConfig(state_dir=tmp_path)
    assert cfg.diag.enabled is False
    assert cfg.diag.listen_host == "127.0.0.1"
    assert isinstance(_metrics(cfg), NullMetrics)
    example = load_config(EXAMPLE)
    assert example.diag == cfg.diag  # the example documents the defaults


def test_enabled_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('state_dir = "."\n[diag]\nenabled = true\nlisten_port = 9100\n'
                    "check_timeout_seconds = 0.5\n")
    cfg = load_config(path)
    assert (cfg.diag.enabled, cfg.diag.listen_port, cfg.diag.check_timeout_seconds) == (
        True, 9100, 0.5)
    assert isinstance(_metrics(cfg), PrometheusMetrics)


@pytest.mark.parametrize(("line", "key"), [
    ("listen_port = 70000", "diag.listen_port"),
    ("check_timeout_seconds = 0", "diag.check_timeout_seconds"),
    ("password = 'x'", "diag.password"),
])
def test_a_bad_value_names_its_key(tmp_path: Path, line: str, key: str) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(f'state_dir = "."\n[diag]\n{line}\n')
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_config(path)
