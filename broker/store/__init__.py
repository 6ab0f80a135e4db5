"""State stores behind the ``GrantStore``, ``TotpStore`` and ``SessionIndex`` ports."""
