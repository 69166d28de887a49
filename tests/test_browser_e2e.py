"""Web pages cannot use the daemon unless the user lets them: ``Origin`` and ``Host`` checks, CORS.

The exact requests of the review: a page's "simple" cross-origin POST (``Content-Type:
text/plain``, ``Origin: https://evil.example``) and a DNS-rebinding page's ``Host:
evil.example:PORT`` were both answered 200 before; scripts send neither and are unaffected.
"""

from __future__ import annotations

import json
import socket
from typing import Callable

from daemon import Daemon, sse_events

PROMPT = json.dumps({"prompt": "hi"}).encode()
TRUSTED = "http://localhost:3000"


def test_pages_and_foreign_hosts_are_refused_trusted_ones_get_cors(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario (``allowed_origins`` [http://localhost:3000], ``allowed_hosts`` [llm.lan]):
    1. a cross-origin simple POST from https://evil.example gets 403 JSON, on ``/`` (``{"Error"}``),
       on ``/v1`` (the OpenAI error object) and on a path that does not exist (403, not 404),
       with ``X-Request-Id``, and nothing is generated;
    2. a preflight from that origin gets 403 too;
    3. ``Host: evil.example:PORT`` gets 421 JSON; loopback names, the bind address and
       ``llm.lan`` (with or without port) are served;
    4. without ``Origin`` (a script) the request gets 200, without CORS headers;
    5. the trusted origin's preflight gets 204 with the Access-Control headers, and its
       requests (plain and streamed) get 200 with ``Access-Control-Allow-Origin``.
    """
    daemon = make_daemon(allowed_origins=[TRUSTED], allowed_hosts=["llm.lan"]).start().wait_serving()
    port = daemon.port
    page = {"Origin": "https://evil.example", "Content-Type": "text/plain"}

    refused = daemon.request("POST", "/", PROMPT, page)
    assert refused.status == 403 and "https://evil.example" in refused.json()["Error"], refused
    assert refused.headers["x-request-id"] and "access-control-allow-origin" not in refused.headers
    refused = daemon.request("POST", "/v1/chat/completions", b'{"messages": []}', page)
    assert refused.status == 403 and "allowed_origins" in refused.json()["error"]["message"], refused
    assert daemon.request("GET", "/no/such/path", None, page).status == 403
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    assert daemon.request("OPTIONS", "/", None, preflight).status == 403
    assert "request from" not in daemon.log_text()  # no route ran
    daemon.wait_log("rejected POST /: 403")

    rebound = daemon.request("POST", "/", PROMPT, {"Host": f"evil.example:{port}", "Content-Type": "text/plain"})
    assert rebound.status == 421 and "evil.example" in rebound.json()["Error"], rebound
    assert daemon.request("GET", "/v1/models", None, {"Host": "evil.example"}).status == 421
    for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}", "LOCALHOST.", f"llm.lan:{port}", "llm.lan"):
        assert daemon.request("GET", "/v1/models", None, {"Host": host}).status == 200, host
    assert "request from" not in daemon.log_text().split("rejected GET /v1/models: 421")[0]

    script = daemon.request("POST", "/", PROMPT, {"Content-Type": "text/plain"})
    assert script.status == 200 and "access-control-allow-origin" not in script.headers, script

    ask = {"Origin": TRUSTED, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    preflight_answer = daemon.request("OPTIONS", "/v1/chat/completions", None, ask)
    assert preflight_answer.status == 204, preflight_answer
    assert preflight_answer.headers["access-control-allow-origin"] == TRUSTED
    assert "POST" in preflight_answer.headers["access-control-allow-methods"]
    assert preflight_answer.headers["access-control-allow-headers"] == "authorization, content-type"
    assert preflight_answer.headers["x-request-id"]
    trusted = daemon.request("POST", "/", PROMPT, {"Origin": TRUSTED, "Content-Type": "application/json"})
    assert trusted.status == 200 and trusted.headers["access-control-allow-origin"] == TRUSTED, trusted
    assert "X-Request-Id" in trusted.headers["access-control-expose-headers"]
    status, headers, events = sse_events(daemon, "/", {"prompt": "hi", "stream": True}, {"Origin": TRUSTED})
    assert status == 200 and headers["access-control-allow-origin"] == TRUSTED and events[-1]["done"]


def test_bound_to_every_interface_the_machines_addresses_are_hosts(make_daemon: Callable[..., Daemon]) -> None:
    """Scenario (``listening_host`` 0.0.0.0): a ``Host`` that is an IP literal (any of the
    machine's addresses; an address cannot be rebound) or the machine's own name is served; any
    other name still gets 421, and a page's ``Origin`` still 403."""
    daemon = make_daemon(listening_host="0.0.0.0").start().wait_serving()
    for host in ("192.0.2.7", f"192.0.2.7:{daemon.port}", f"[fe80::1]:{daemon.port}", socket.gethostname()):
        assert daemon.request("GET", "/v1/models", None, {"Host": host}).status == 200, host
    assert daemon.request("GET", "/v1/models", None, {"Host": "evil.example"}).status == 421
    assert daemon.request("GET", "/v1/models", None, {"Origin": "http://192.0.2.7"}).status == 403
