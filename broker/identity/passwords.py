"""Password hashes for the static directory: argon2id (preferred) or bcrypt, verified off-loop."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import argon2
import bcrypt

# OWASP's argon2id baseline (19 MiB, 2 passes): ~20 ms here; a login's cost is dominated by it.
_HASHER = argon2.PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
# A real hash of a random password, verified for unknown users so they take as long as known ones.
_DUMMY_HASH = _HASHER.hash("bastion-broker-timing-equaliser")


def hash_password(password: str) -> str:
    """An argon2id hash string for storing in the users file."""
    return _HASHER.hash(password)


def verify_password_sync(stored_hash: str | None, password: str) -> bool:
    """Check ``password``; with ``stored_hash`` None, spend the same time and return False."""
    if stored_hash is None:
        stored_hash = _DUMMY_HASH
        password = password + "\x00never"
    try:
        if stored_hash.startswith("$argon2"):
            return _HASHER.verify(stored_hash, password)
        if stored_hash.startswith(("$2a$", "$2b$", "$2y$")):
            return bcrypt.checkpw(password.encode(), stored_hash.encode())
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError, ValueError):
        return False
    return False


# Each argon2 check allocates its 19 MiB in the calling thread; two dedicated threads bound both
# the CPU a login storm can take from relayed sessions and the memory glibc keeps afterwards.
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="argon2")


async def verify_password(stored_hash: str | None, password: str) -> bool:
    """Like :func:`verify_password_sync` in a worker thread (the hash releases the GIL)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_POOL, verify_password_sync, stored_hash, password)


def is_supported_hash(value: str) -> bool:
    return value.startswith(("$argon2id$", "$argon2i$", "$2a$", "$2b$", "$2y$"))
