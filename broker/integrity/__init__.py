"""Tamper evidence: the bastion's Ed25519 signing key, signed recording manifests, ``verify``."""
