"""Health and metrics for monitoring (``[diag]``, off by default): ``/healthz``, ``/readyz``
(``checks``) and ``/metrics`` (``metrics``: Prometheus text format), served by ``server``."""
