"""Driving a real ``llm-server`` from tests: config files, the subprocess, HTTP and its processes.

Nothing here fakes the daemon: ``Daemon`` writes a ``config.json`` into a temp working
directory, starts ``python -m llm_server`` there as its own process group, and talks to it over
real sockets. The raw-socket helpers exist for requests ``http.client`` will not send (chunked
bodies over the size limit, bodies that are not UTF-8).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import psutil

ROOT = Path(__file__).resolve().parents[1]


_SERVING = re.compile(r"serving on http://\S+?:(\d+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_config(model_dir: Path | str, port: int, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model_name": str(model_dir),
        "listening_port": port,
        "servers": {},
        "system_prompt": "You are a helpful assistant.",
        "temperature": 0.0,
        "top_p": 1.0,
        "min_p": 0.0,
        "min_tokens_to_keep": 1,
        "log_level": "trace",
        "log_filename": "llm-server.log",
        "max_tokens": 24,
    }
    config.update(overrides)
    return config


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Daemon:
    """One ``llm-server`` subprocess in its own working directory."""

    def __init__(self, workdir: Path, config: dict[str, Any] | None, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            (workdir / "config.json").write_text(json.dumps(config, indent=2))
        self.config = config or {}
        self.port = int(self.config.get("listening_port", 0) or 0)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0  # where this start's lines begin in the log (a restart appends)

    @property
    def log_path(self) -> Path:
        return self.workdir / self.config.get("log_filename", "llm-server.log")

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8") if self.log_path.exists() else ""

    def start(self) -> Daemon:
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_server"],
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        return self

    def wait_serving(self, timeout: float = 90.0) -> Daemon:
        """Wait until the port accepts connections; fail with the log if the daemon exits. With
        ``listening_port`` 0 the daemon binds any free port, and its "serving on" line says which."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.output()}\n{self.log_text()}")
            fresh = self.log_path.read_bytes()[self._log_start :] if self.log_path.exists() else b""
            serving = _SERVING.search(fresh.decode("utf-8", errors="replace"))
            if serving:
                if not self.config.get("listening_port"):
                    self.port = int(serving.group(1))
                if port_open(self.port):
                    return self
            time.sleep(0.1)
        raise AssertionError(f"daemon not serving after {timeout} s:\n{self.log_text()}")

    def response_line(self, request_id: str, timeout: float = 30.0) -> str:
        """The log line of a request's response (it reaches the file a moment after the answer)."""
        status_line = re.compile(rf" {re.escape(request_id)} response \d{{3}} ")  # not "response text:"
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.log_text().splitlines() if status_line.search(line)]
            if lines:
                return lines[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no response line for {request_id} after {timeout} s:\n{self.log_text()}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running after {timeout} s:\n{self.log_text()}") from None

    def output(self) -> str:
        """stdout+stderr of an exited daemon."""
        assert self.proc is not None
        out, err = self.proc.communicate(timeout=10)
        return (out + err).decode("utf-8", "replace")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def descendants(self) -> list[int]:
        assert self.proc is not None
        return descendants(self.proc.pid)

    def kill_all(self) -> None:
        """Cleanup: whatever is left of the process group dies."""
        if self.proc is None:
            return
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)

    def wait_log(self, needle: str, count: int = 1, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_text().count(needle) >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in log {count} time(s) after {timeout} s:\n{self.log_text()}")

    # --- HTTP -------------------------------------------------------------------------------

    def request(self, method: str, path: str = "/", body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 120.0) -> HttpResult:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return HttpResult(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            conn.close()

    def post_json(self, document: Any, timeout: float = 120.0) -> HttpResult:
        return self.request("POST", "/", json.dumps(document).encode(), {"Content-Type": "application/json"},
                            timeout=timeout)

    def ask(self, prompt: str, timeout: float = 120.0) -> HttpResult:
        return self.post_json({"prompt": prompt}, timeout=timeout)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def raw_exchange(port: int, head: bytes, chunks: Iterable[bytes], timeout: float = 30.0) -> HttpResult:
    """Send a request piece by piece, stop sending if the server hangs up, read its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = read_answer(sock)
    return parse_response(data)


def read_answer(sock: socket.socket, head_only: bool = False) -> bytes:
    """Read one HTTP response (just its head for a HEAD request), or what came before EOF."""
    data = b""
    try:
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
            if _complete(data, head_only):
                break
    except (ConnectionResetError, socket.timeout):
        pass
    return data


def _complete(data: bytes, head_only: bool = False) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    if head_only:
        return True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def parse_response(data: bytes) -> HttpResult:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        raise AssertionError(f"no HTTP response, got {data[:200]!r}")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:  # what follows is the answer to a next (pipelined) request
        body = body[: int(headers["content-length"])]
    return HttpResult(status, headers, body)


def descendants(pid: int) -> list[int]:
    """All live (not zombie) descendants of ``pid``."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c.pid for c in children if _alive(c)]


def cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline()).strip()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def ask_in_background(daemon: Daemon, prompts: list[str]) -> tuple[list[threading.Thread], dict[int, object]]:
    """Send each prompt from its own thread; results[i] is the HttpResult or the exception."""
    results: dict[int, object] = {}

    def client(i: int, prompt: str) -> None:
        try:
            results[i] = daemon.ask(prompt, timeout=180)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    return threads, results


def assert_gone(pids: list[int], grace_s: float = 5.0) -> None:
    """Every pid has exited (multiprocessing's resource tracker needs a moment after EOF)."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not alive, f"processes left behind: {[(p, cmdline(p)) for p in alive]}"


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        return _alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False

def post_and_hang_up(daemon: Daemon, prompt: str, linger_s: float = 0.0, until: str = "request from") -> None:
    """POST a prompt, wait until the daemon has logged ``until`` once more (by default: the
    request), and ``linger_s`` more, then close the connection without reading the answer, as an
    impatient client does."""
    body = json.dumps({"prompt": prompt}).encode()
    head = f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    head += "\r\n"
    before = daemon.log_text().count(until)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        daemon.wait_log(until, count=before + 1)
        time.sleep(linger_s)


@contextlib.contextmanager
def serving(workdir: Path, config: dict[str, Any], timeout: float = 90.0) -> Iterator[Daemon]:
    """A daemon that serves for the duration of the block, then is killed."""
    daemon = Daemon(workdir, config)
    try:
        yield daemon.start().wait_serving(timeout)
    finally:
        daemon.kill_all()


def sse_events(daemon: Daemon, path: str, document: Any, headers: dict[str, str] | None = None,
               stop_after: int | None = None, timeout: float = 120.0,
               named: bool = False) -> tuple[int, dict[str, str], list[Any]]:  # fmt: skip
    """POST ``document`` and read the Server-Sent Events answer: (status, headers, events), each
    event's ``data`` decoded from JSON (``[DONE]`` kept as the string); ``named``: each event as
    (its ``event:`` name or None, data). With ``stop_after``, the connection is closed after that
    many events (a client that goes away mid-stream)."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(document).encode(),
                     headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        head = {k.lower(): v for k, v in response.getheaders()}
        if not head.get("content-type", "").startswith("text/event-stream"):
            return response.status, head, [json.loads(response.read())]
        events: list[Any] = []
        name = None
        while stop_after is None or len(events) < stop_after:
            line = response.readline()
            if not line:
                break
            line = line.rstrip(b"\r\n")
            if line.startswith(b"event: "):
                name = line[len(b"event: "):].decode()
            elif line.startswith(b"data: "):
                data = line[len(b"data: "):].decode()
                value = data if data == "[DONE]" else json.loads(data)
                events.append((name, value) if named else value)
                name = None
        return response.status, head, events
    finally:
        conn.close()
