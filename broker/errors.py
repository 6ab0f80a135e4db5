"""One error tree. ``user_message`` is what a person may see; details go to logs and the audit."""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""

    user_message = "internal error"


class ConfigError(BrokerError):
    """A configuration file is missing, unreadable or invalid; the message names file and key."""

    @property
    def user_message(self) -> str:  # type: ignore[override]
        return str(self)


class UsageError(BrokerError):
    """A CLI argument is invalid; the message says which and why."""

    @property
    def user_message(self) -> str:  # type: ignore[override]
        return str(self)


class NotFoundError(BrokerError):
    """A named object (session, grant, user) does not exist."""

    @property
    def user_message(self) -> str:  # type: ignore[override]
        return str(self)


class StoreError(BrokerError):
    """The state store failed; access fails closed."""

    user_message = "service temporarily unavailable"


class ConflictError(BrokerError):
    """A concurrent change won (optimistic concurrency); the caller may reload and retry."""

    @property
    def user_message(self) -> str:  # type: ignore[override]
        return str(self)


class RecordingError(BrokerError):
    """A recording could not be opened or written; the session must not run unrecorded."""

    user_message = "session recording unavailable; access refused"


class AuditError(BrokerError):
    """The audit trail could not be written; the action it describes must not proceed."""

    user_message = "audit trail unavailable; access refused"


class UpstreamError(BrokerError):
    """The target could not be reached or did not accept the broker's certificate."""

    user_message = "target unavailable"


class RecordingDiskFull(RecordingError):
    """New sessions are refused: the recordings file system is below its free-space threshold."""

    user_message = ("recording storage on this bastion is almost full: no new sessions can start "
                    "now; try again later or contact the bastion operators")


class NotifyError(BrokerError):
    """A notification was not delivered; the message (no secrets) goes to the delivery log."""

    @property
    def user_message(self) -> str:  # type: ignore[override]
        return str(self)
