"""Recording sinks behind the ``RecordingSink`` port."""
