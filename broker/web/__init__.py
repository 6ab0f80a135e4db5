"""The HTTP API (aiohttp) for the grant workflow: login with AD password + TOTP, signed session
cookies, scoped API tokens, and an OpenAPI document built from the same route table."""

from broker.web.api import WebContext, create_app
from broker.web.server import WebServer

__all__ = ["WebContext", "WebServer", "create_app"]
