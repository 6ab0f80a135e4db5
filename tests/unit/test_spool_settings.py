"""``[shipping]`` configuration: clear errors for bad values, relative paths resolved."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import load_config
from broker.errors import ConfigError


def _write(tmp_path: Path, shipping: str) -> Path:
    p = tmp_path / "broker.toml"
    p.write_text(f'state_dir = "state"\n{shipping}\n')
    return p


def test_defaults_ship_nothing(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, ""))
    assert cfg.shipping.s3 is None and cfg.shipping.cloudwatch is None
    assert cfg.shipping_spool_dir == tmp_path / "state" / "shipping"


def test_full_section_loads_and_resolves_paths(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, """
[shipping]
spool_dir = "spool"
[shipping.s3]
bucket = "corp-bastion-recordings"
region = "eu-west-1"
endpoint_url = "http://127.0.0.1:9000"
access_key_id = "minio"
secret_access_key_file = "minio.secret"
sse = "aws:kms"
kms_key_id = "alias/recordings"
object_lock_mode = "COMPLIANCE"
object_lock_days = 365
keep_local_days = 0
[shipping.cloudwatch]
region = "eu-west-1"
log_group = "/corp/bastion/audit"
"""))
    s3 = cfg.shipping.s3
    assert s3 is not None and s3.secret_access_key_file == tmp_path / "minio.secret"
    assert s3.multipart_threshold == 64 * 1024 * 1024
    assert cfg.shipping_spool_dir == tmp_path / "spool"
    assert cfg.shipping.cloudwatch is not None
    assert cfg.shipping.cloudwatch.log_stream is None  # the host name at run time


@pytest.mark.parametrize(("section", "message"), [
    ('[shipping.s3]\nbucket = "Bad_Bucket"', "not an S3 bucket name"),
    ('[shipping.s3]\nbucket = "b-1"\nobject_lock_mode = "COMPLIANCE"', "go together"),
    ('[shipping.s3]\nbucket = "b-1"\nobject_lock_days = 3', "go together"),
    ('[shipping.s3]\nbucket = "b-1"\nkms_key_id = "k"', "needs sse"),
    ('[shipping.s3]\nbucket = "b-1"\naccess_key_id = "k"', "go together"),
    ('[shipping.s3]\nbucket = "b-1"\nendpoint_url = "ftp://x"', "http(s) URL"),
    ('[shipping.s3]\nbucket = "b-1"\nendpoint_url = "http://u:p@x"', "credentials"),
    ('[shipping.s3]\nbucket = "b-1"\nregion = "mars"', "not an AWS region"),
    ('[shipping.s3]\nbucket = "b-1"\nprefix = "/abs"', "relative key prefix"),
    ('[shipping.s3]\nbucket = "b-1"\nmultipart_chunk_mb = 1', "shipping.s3.multipart_chunk_mb"),
    ('[shipping.s3]\nbucket = "b-1"\nsse = "md5"', "shipping.s3.sse"),
    ("[shipping.s3]\n", "shipping.s3.bucket"),
    ('[shipping.cloudwatch]\nlog_group = "a:b"', "not a CloudWatch Logs name"),
    ('[shipping.cloudwatch]\nbatch_max_events = 20000', "batch_max_events"),
    ('[shipping]\nbogus = 1', "shipping.bogus"),
])
def test_bad_values_are_named(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, section))
    assert message in str(err.value)


def test_the_documented_example_is_valid(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "shipping.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = load_config(_write(tmp_path, block))
    assert cfg.shipping.s3 is not None and cfg.shipping.s3.object_lock_days == 365
    assert cfg.shipping.cloudwatch is not None
