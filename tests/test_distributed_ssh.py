"""The distributed group with every rank started through ssh, as on two Macs, on one machine.

``mlx.launch`` starts a rank locally only when its host is literally ``127.0.0.1``; a hostfile
whose hosts are ``{"ssh": "localhost", "ips": ["127.0.0.1"]}`` makes it ssh to this machine for
both ranks, so they see only what travels by ``--env``. The test runs its own ``sshd`` on a free
loopback port with its own host key, key login for this user from a temp folder (nothing in
``~/.ssh`` is touched), and an ``ssh`` first on the daemon's ``PATH`` that points the launcher's
ssh at it with ``-F``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from daemon import Daemon, base_config, cmdline, descendants, free_port, port_open, pid_alive
from tool_model import CALC_SERVER

SSHD = Path("/usr/sbin/sshd")
PIRATE = {"prompt": "Why?", "system_prompt": "You are a pirate."}
RANK_TITLE = "llm-server: model-worker rank"


@dataclass
class Sshd:
    pid: int
    bin_dir: Path  # holds the `ssh` that reaches this sshd

    def ranks(self) -> list[int]:
        """Ranks started through this sshd (they are its descendants, not the daemon's)."""
        return [p for p in descendants(self.pid) if cmdline(p).startswith(RANK_TITLE)]


def _install_sshd() -> None:
    """Debian's openssh-server, where this is root on a machine with apt; else a skip that says why."""
    if SSHD.exists():
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip(f"{SSHD} is missing and cannot be installed here (needs root and apt-get: openssh-server)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "openssh-server"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    _install_sshd()
    folder = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True)
    (folder / "authorized_keys").write_text((folder / "id.pub").read_text())
    host_key = (folder / "host_key.pub").read_text().split()
    (folder / "known_hosts").write_text(f"llm-server-test {host_key[0]} {host_key[1]}\n")
    port = free_port()
    (folder / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {folder / 'host_key'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nPrintMotd no\n"
    )  # fmt: skip
    (folder / "ssh_config").write_text(
        f"Host localhost\n  HostName 127.0.0.1\n  Port {port}\n  HostKeyAlias llm-server-test\n"
        f"  IdentityFile {folder / 'id'}\n  IdentitiesOnly yes\n  BatchMode yes\n"
        f"  UserKnownHostsFile {folder / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
    )  # fmt: skip
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    ssh.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {folder / "ssh_config"} "$@"\n')
    ssh.chmod(0o755)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    log = open(folder / "sshd.log", "wb")  # noqa: SIM115 - closed at teardown
    server = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(folder / "sshd_config")], stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not port_open(port):
            assert server.poll() is None and time.monotonic() < deadline, (folder / "sshd.log").read_text()
            time.sleep(0.05)
        check = subprocess.run([str(ssh), "localhost", "true"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr + (folder / "sshd.log").read_text()
        yield Sshd(server.pid, bin_dir)
    finally:
        server.terminate()
        server.wait(10)
        log.close()


def test_ranks_started_through_ssh_serve(make_daemon: Callable[..., Daemon], tiny_model: Path, sshd: Sshd,
                                         tmp_path: Path) -> None:  # fmt: skip
    """Scenario:
    1. one process answers a greedy request (the reference);
    2. a daemon whose hostfile puts both ranks on "localhost" (ssh) starts and serves, with
       the tiny model as it is (one weights file, no index: pipeline mode derives it), and
       rank 0 starts an MCP server whose command is found only on the daemon's own PATH;
    3. its answer is the one process's; the authentication key is in a 0600 file and on no
       command line;
    4. SIGTERM: exit 0, no rank left, the key's folder removed.
    """
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "calc-mcp").write_text(f"#!/bin/sh\nexec {sys.executable} {CALC_SERVER}\n")
    (tools / "calc-mcp").chmod(0o755)
    # It offers no tools, so that the prompt (and the answer) is the one without servers.
    settings = {"max_tokens": 30, "servers": {"calc": {"command": "calc-mcp", "allowedTools": []}}}
    env = {"PATH": f"{sshd.bin_dir}:{tools}:{os.environ['PATH']}"}
    one = make_daemon(base_config(tiny_model, 0, **settings), env=env, name="one").start().wait_serving()
    reference = one.post_json(PIRATE).json()["response"]
    one.signal()
    assert one.wait_exit() == 0 and reference

    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "localhost", "ips": ["127.0.0.1"]}] * 2))
    group = {"hostfile": str(hostfile), "mode": "pipeline", "starting_port": free_port()}
    daemon = make_daemon(base_config(tiny_model, 0, distributed=group, **settings), env=env, name="group")
    daemon.start().wait_serving(180)
    assert "MCP host ready: 1 of 1 servers up" in daemon.log_text()
    ranks = sshd.ranks()
    assert len(ranks) == 2, [cmdline(p) for p in descendants(sshd.pid)]
    answer = daemon.post_json(PIRATE)
    assert answer.status == 200 and answer.json()["response"] == reference

    (launcher,) = [cmdline(p) for p in daemon.descendants() if "mlx.launch" in cmdline(p)]
    key_file = Path(re.search(r"LLM_SERVER_AUTHKEY_FILE=(\S+)", launcher)[1])  # type: ignore[index]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    key = key_file.read_bytes()
    processes = [daemon.proc.pid, *daemon.descendants(), *descendants(sshd.pid)]  # type: ignore[union-attr]
    command_lines = [cmdline(p) for p in processes]
    assert len(key) >= 16 and not any(key.hex() in c for c in command_lines)

    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(120) == 0
    deadline = time.monotonic() + 10
    while sshd.ranks() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sshd.ranks() and not any(pid_alive(p) for p in ranks)
    assert not key_file.parent.exists()


def test_ring_hosts_given_as_names_are_a_config_error(make_daemon: Callable[..., Daemon], tiny_model: Path) -> None:
    """``hosts`` with a name and the ring backend: exit 2 before anything starts, saying the
    ring needs IP addresses (not a launcher traceback)."""
    group = {"hosts": ["127.0.0.1", "mac-b.local"], "mode": "pipeline"}
    daemon = make_daemon(base_config(tiny_model, 0, distributed=group)).start()
    assert daemon.wait_exit() == 2
    output = daemon.output()
    assert "the ring backend needs IP addresses" in output and "mac-b.local" in output, output
    assert "Traceback" not in output
