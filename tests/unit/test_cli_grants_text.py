"""How the grant CLI words what it shows: history changes, the state column, --timeout."""

from __future__ import annotations

import pytest

from broker.cli.grants import _state, changes_text, parse_timeout
from broker.errors import UsageError


def test_changes_read_before_arrow_after() -> None:
    assert changes_text({
        "expires_at": {"before": "2030-01-01T18:00:00+00:00", "after": "2030-01-01T16:30:00+00:00"},
        "state": {"before": "pending", "after": "approved"},
        "approved_by": {"before": [], "after": ["bob@corp.example.com"]},
        "ticket": {"before": "", "after": "INC-2"},
        "approvals": 1,
    }) == ("expires_at: 2030-01-01 18:00 -> 2030-01-01 16:30; state: pending -> approved; "
           "approved_by: - -> bob@corp.example.com; ticket: - -> INC-2; approvals: 1")
    assert changes_text({}) == ""


def test_state_column_says_active_inside_the_window() -> None:
    assert _state({"state": "approved", "active": True}) == "active"
    assert _state({"state": "approved", "active": False}) == "approved"  # starts later
    assert _state({"state": "expired"}) == "expired"  # an older server without the flag


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("1.5m", 90),
                                                ("2h", 7200)])
def test_timeout_forms(text: str, seconds: float) -> None:
    assert parse_timeout(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-1", "10d", "soon", "1 h"])
def test_bad_timeouts_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match="--timeout"):
        parse_timeout(text)
