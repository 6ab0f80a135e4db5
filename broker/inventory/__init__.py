"""Inventory backends behind the ``Inventory`` port: which instances a stack holds."""
