"""Notification channels: signed webhooks (``webhook``) and e-mail over SMTP (``email``), built
from ``[notify]`` by ``channels``; the dispatcher in ``broker.services.notify`` drives them."""
