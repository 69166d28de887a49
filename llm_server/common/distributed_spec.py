"""The optional ``distributed`` block of ``config.json``: the model worker as an MLX distributed
group that ``mlx.launch`` starts."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config_checker import Checker, resolve_path
from .config_error import ConfigError


@dataclass(frozen=True)
class DistributedSpec:
    """The optional ``distributed`` block: the model worker as an MLX distributed group that
    ``mlx.launch`` starts (see the README's "Bigger models")."""

    mode: str  # "pipeline" or "tensor": how mlx-lm's sharded_load splits the model
    backend: str = "ring"
    hosts: tuple[str, ...] = ()
    hostfile: str | None = None
    ranks_per_host: int = 1
    starting_port: int | None = None


def parse_distributed(path: Path, value: Any) -> DistributedSpec | None:
    if value is None:
        return None
    where = f"{path}: 'distributed'"
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be an object")
    check = Checker(path, value)
    mode = value.get("mode", "pipeline")
    if mode not in ("pipeline", "tensor"):
        raise ConfigError(f'{where}.mode must be "pipeline" or "tensor"')
    backend = value.get("backend", "ring")
    if backend not in ("ring", "jaccl", "mpi"):
        raise ConfigError(f"{where}.backend must be one of ring, jaccl, mpi")
    hosts = value.get("hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError(f"{where}.hosts must be a list of host names")
    hostfile = value.get("hostfile")
    if hostfile is not None:
        if not isinstance(hostfile, str) or not hostfile:
            raise ConfigError(f"{where}.hostfile must be a file name")
        hostfile = str(resolve_path(path, hostfile))
    if bool(hosts) == (hostfile is not None):
        raise ConfigError(f"{where} needs either 'hosts' or 'hostfile'")
    # mlx.launch's ring connects the ranks by address; names are not resolved (a host may have
    # several addresses, and which interface the ring should use is the user's choice).
    if backend == "ring" and hostfile is not None:
        names = _hosts_without_ips(where, Path(hostfile))
        if names:
            raise ConfigError(
                f"{where}.hostfile {hostfile}: the ring backend needs IP addresses: give 'ips' for {', '.join(names)}"
            )
    names = [h for h in hosts if not _is_ip(h)]
    if backend == "ring" and names:
        raise ConfigError(
            f"{where}.hosts: the ring backend needs IP addresses, not host names ({', '.join(names)}); "
            "give IPs, or a 'hostfile' with each host's ssh name and its 'ips'"
        )
    return DistributedSpec(
        mode=mode,
        backend=backend,
        hosts=tuple(hosts),
        hostfile=hostfile,
        ranks_per_host=check.integer("ranks_per_host", 1, 64, default=1),
        starting_port=check.integer("starting_port", 1024, 65535, default=None) if "starting_port" in value else None,
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _hosts_without_ips(where: str, hostfile: Path) -> list[str]:
    """The ssh names in an ``mlx.launch`` host file (a list of hosts, or ``{"hosts": [...]}``)
    that come without ``ips``."""
    try:
        data = json.loads(hostfile.read_text(encoding="utf-8"))
        hosts = data["hosts"] if isinstance(data, dict) else data
        return [str(h.get("ssh")) for h in hosts if not h.get("ips")]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{where}.hostfile {hostfile}: not a readable mlx.launch host file ({exc})") from None
