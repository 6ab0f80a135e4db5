"""Audit sinks behind the ``AuditSink`` port."""
