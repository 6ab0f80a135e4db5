"""Async orchestration over the ports: authentication, access decisions, recorded sessions."""
