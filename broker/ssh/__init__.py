"""asyncssh adapters: the client-facing server, the relay, and the upstream client with the CA."""
