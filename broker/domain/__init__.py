"""Pure domain logic: no I/O, no asyncio, every time-dependent function takes ``now``."""
