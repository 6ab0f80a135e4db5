"""bastion-broker: an SSH/RDP bastion that authenticates, checks live grants, relays and records."""

__version__ = "0.1.0"
