"""What web browsers may do: the ``Host`` and ``Origin`` checks, and CORS for trusted pages.

The daemon's users are scripts and programs; they send no ``Origin``. A web page the user visits
can still reach a daemon on ``localhost``: with a "simple" cross-origin POST (the browser sends it
and hides only the answer) or through DNS rebinding (its own name resolving to 127.0.0.1, so the
browser even lets it read the answers). So, before anything else runs, a request whose
``Host`` is not a name of this daemon is answered 421 (the same rule and status as the MCP SDK's
DNS-rebinding protection), one whose ``Origin`` is not in ``allowed_origins`` 403; pages of the
allowed origins get CORS headers and their ``OPTIONS`` preflights answered.

Names of this daemon: the loopback names, the bind address (``listening_host``) and
``allowed_hosts``; bound to every interface (``0.0.0.0``, ``::``), also any IP literal (an address
cannot be rebound to another machine) and the machine's own host name.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from sanic import Request, Sanic
from sanic.exceptions import Forbidden, SanicException
from sanic.response import HTTPResponse

from ..common.config import Config
from .answers import name_request

log = logging.getLogger("llm_server.http")

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
ALLOW_METHODS = "GET, POST, OPTIONS"
EXPOSE_HEADERS = "X-Request-Id, Retry-After"
PREFLIGHT_MAX_AGE_S = "600"


class MisdirectedRequest(SanicException):
    """The ``Host`` names another server: a DNS-rebinding page, or a misrouted request."""

    status_code = 421
    quiet = True


def register(app: Sanic, config: Config) -> None:
    """Check every request's ``Host`` and ``Origin`` first, and add CORS for allowed origins."""
    hosts = _daemon_names(config)
    origins = frozenset(config.allowed_origins)
    any_host, any_origin = "*" in hosts, "*" in origins
    every_interface = config.listening_host.strip("[]") in WILDCARD_BINDS  # then IP literals are ours

    @app.on_request(priority=100)  # before every other middleware; also runs for 404, 405 and 413
    async def _guard(request: Request) -> HTTPResponse | None:
        host = request.headers.get("host")  # absent only from HTTP/1.0 scripts: browsers always send it
        if host is not None and not any_host and _host_name(host) not in hosts and not (every_interface and _is_ip(host)):
            raise MisdirectedRequest(f"Host {host!r} is not a name of this server (allowed_hosts)")
        origin = request.headers.get("origin")
        if origin is None:
            return None
        if not any_origin and origin.lower() not in origins:
            raise Forbidden(f"requests from web pages of origin {origin!r} are not allowed (allowed_origins)")
        if request.method == "OPTIONS" and "access-control-request-method" in request.headers:
            headers = {
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Max-Age": PREFLIGHT_MAX_AGE_S,
                "X-Request-Id": name_request(request),
            }
            if "access-control-request-headers" in request.headers:  # e.g. authorization, content-type
                headers["Access-Control-Allow-Headers"] = request.headers["access-control-request-headers"]
            log.info("preflight from %s for %s %s: 204", origin, request.headers["access-control-request-method"],
                     request.path)  # fmt: skip
            return HTTPResponse(status=204, headers=headers)  # CORS headers: added on the way out
        return None

    @app.on_response
    async def _cors(request: Request, response: HTTPResponse) -> None:
        origin = request.headers.get("origin")
        if origin is not None and (any_origin or origin.lower() in origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
            response.headers["Vary"] = "Origin"


def _daemon_names(config: Config) -> frozenset[str]:
    names = set(LOOPBACK_NAMES) | set(config.allowed_hosts)
    bind = config.listening_host.lower().strip("[]")
    if bind in WILDCARD_BINDS:
        machine = socket.gethostname().lower()
        names |= {machine, machine.split(".")[0] + ".local", socket.getfqdn().lower()}
    else:
        names.add(bind)
    return frozenset(names)


def _host_name(host: str) -> str:
    """``Host`` without its port, brackets or trailing dot, in lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


def _is_ip(host: str) -> bool:
    """An IP literal in ``Host`` cannot come from a rebound name (legitimate when bound to every
    interface, where every address of the machine is the daemon's)."""
    try:
        ipaddress.ip_address(_host_name(host))
    except ValueError:
        return False
    return True
