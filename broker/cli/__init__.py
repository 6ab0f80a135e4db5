"""``bastion-broker``: run the broker or the demo, and operate it (grants, sessions, TOTP, users).

One module per command group (each has ``register(sub)``), shared helpers in ``common`` and
``output``; ``entry.main`` parses, routes warnings into logging and turns every ``BrokerError``
into one line on stderr (``bastion-broker: error: ...``, exit status 2), never a traceback.
"""

from broker.cli.entry import main

__all__ = ["main"]
