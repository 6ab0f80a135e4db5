"""Identity backends behind the ``Directory`` port."""
