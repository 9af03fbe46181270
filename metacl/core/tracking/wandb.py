"""Weights & Biases tracker, offline by default.

Offline runs are written inside the run directory (`<run>/wandb/offline-run-*`) and need no
network, login or API key; upload them later with `wandb sync <run>/wandb/offline-run-*`.
Online mode uses whatever login the machine has: metacl never stores or logs an API key; it
only checks, before the run starts, that one is there (WANDB_API_KEY or a .netrc entry) and
that the W&B server answers (a 3-second connection attempt), and says so if not. The W&B run
id is derived from the run directory, so a resumed run continues the same W&B run, and the
sweep folder becomes the W&B group.
"""

from __future__ import annotations

import hashlib
import netrc
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

DEFAULT_BASE_URL = "https://api.wandb.ai"
CONNECT_TIMEOUT_S = 3.0
OFFLINE_HINT = (
    "or use tracking.wandb_mode=offline (the default), which needs neither an API key nor "
    "a network: the run is written to <run>/wandb/ and `wandb sync` uploads it later"
)


def _host_port(url: str, default_host: str = "api.wandb.ai") -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    try:
        port = parts.port or (80 if parts.scheme == "http" else 443)
    except ValueError:
        port = 443
    return parts.hostname or default_host, port


def wandb_server() -> tuple[str, int]:
    """(host, port) of the W&B server: $WANDB_BASE_URL, else api.wandb.ai:443."""
    return _host_port(os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL)


def first_hop() -> tuple[str, int, str]:
    """Where W&B's connection goes first: (host, port, description) of the server, or of the
    proxy ($HTTPS_PROXY / $HTTP_PROXY) that W&B would go through."""
    host, port = wandb_server()
    base = os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL
    scheme = "http" if base.startswith("http://") else "https"
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_host, proxy_port = _host_port(proxy)
        return proxy_host, proxy_port, f"the proxy {proxy_host}:{proxy_port} (for {host})"
    return host, port, f"the W&B server {host}:{port}"


def netrc_path() -> Path:
    """The .netrc file W&B reads its login from: $NETRC, else ~/.netrc (or ~/_netrc)."""
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    unix = Path("~/.netrc").expanduser()
    windows = Path("~/_netrc").expanduser()
    return windows if not unix.exists() and windows.exists() else unix


def has_api_key(host: str) -> bool:
    """Whether W&B will find a login: $WANDB_API_KEY, $WANDB_IDENTITY_TOKEN_FILE, or a .netrc
    entry with a password for `host`. Only presence is checked: the key is never kept or shown."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = netrc_path()
    try:
        entry = netrc.netrc(path).authenticators(host)
        return bool(entry and entry[2])
    except netrc.NetrcParseError:  # e.g. a too-permissive file; W&B may still read it
        tokens = path.read_text(errors="replace").split()
        return any(a == "machine" and b == host for a, b in zip(tokens, tokens[1:]))
    except OSError:
        return False


def connect_problem(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why a TCP connection to host:port fails within `timeout_s` (name lookup included), or None."""
    result: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(None)
        except OSError as error:
            result.append(str(error) or type(error).__name__)

    thread = threading.Thread(target=attempt, daemon=True, name="metacl-wandb-check")
    thread.start()
    thread.join(timeout_s + 0.5)  # getaddrinfo ignores socket timeouts
    return result[0] if result else f"no answer within {timeout_s:g} s"


def check_online(mode: str) -> None:
    """In online mode, refuse (ConfigError) when W&B has no API key or its server is unreachable,
    before the run starts; offline mode needs neither and checks nothing."""
    if mode != "online":
        return
    host, port = wandb_server()
    if not has_api_key(host):
        raise ConfigError(
            f"tracking.wandb_mode=online needs a W&B API key, and none was found (no WANDB_API_KEY "
            f"environment variable and no entry for {host} in {netrc_path()}); run `wandb login` "
            f"or set WANDB_API_KEY, {OFFLINE_HINT}"
        )
    hop_host, hop_port, what = first_hop()
    problem = connect_problem(hop_host, hop_port)
    if problem is not None:
        raise ConfigError(
            f"tracking.wandb_mode=online cannot reach {what} from this machine ({problem}); "
            f"check the network or proxy, {OFFLINE_HINT}"
        )


class WandbTracker:
    def __init__(self, config: Any, run_dir: str | Path, run_name: str, run_config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "tracking.backends includes wandb, but the wandb package is not installed: pip install 'metacl[wandb]'"
            ) from None
        check_online(config.wandb_mode)
        run_dir = Path(run_dir).resolve()
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=config.wandb_project,
            entity=config.wandb_entity,
            name=run_name,
            id=hashlib.sha256(str(run_dir).encode()).hexdigest()[:16],
            group=run_dir.parent.name,
            dir=str(run_dir),
            mode=config.wandb_mode,
            config=run_config,
            resume="allow",
            reinit="create_new",
            settings=wandb.Settings(
                silent=True, console="off", save_code=False, disable_git=True, x_disable_stats=True
            ),
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()
