"""The process layers, each tested as if the language layer had already failed.

Each test runs *unrestricted* Python in a real sandbox child, forked from a real zygote and confined as every
child is (resource limits, the zygote's network namespace, no_new_privs, unprivileged uid, seccomp): only the
RestrictedPython layer is taken away (tests/sandbox_escape.py). The kernel must still refuse.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from shared.infra.config import SandboxLimits
from shared.jobs.pipeline import Outcome
from shared.sandbox.child import NOBODY
from shared.sandbox.forkserver import ForkServer
from shared.sandbox.runner import SANDBOX_LAYERS, run_script
from tests.sandbox_escape import BOOT
from tests.unit.test_sandbox_runner import bars

LIMITS = SandboxLimits(symbol_timeout_s=5, memory_mb=512)
ALL_LAYERS = {"network_namespace": True, "no_new_privs": True, "unprivileged_uid": True, "seccomp": True}


@pytest.fixture(scope="module")
def escaped() -> Iterator[ForkServer]:
    server = ForkServer(boot=BOOT)
    yield server
    server.close()


def escape(server: ForkServer, code: str) -> Outcome:
    """Run ``code`` unrestricted inside a confined child: its outcome (its ``result``, or its error)."""
    return run_script(code, {}, [bars("A", 5)], LIMITS, server=server)[0]


def refused(server: ForkServer, code: str, error: str = "PermissionError") -> None:
    outcome = escape(server, code + "\nresult = 1")
    assert (outcome.error or {}).get("type") == error, outcome
    assert dict(SANDBOX_LAYERS) == ALL_LAYERS


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("open('/etc/passwd').read()", id="read a file"),
        pytest.param("open('/tmp/af-planted', 'w')", id="write a file"),
        pytest.param("import socket; socket.socket(socket.AF_INET, socket.SOCK_STREAM)", id="tcp socket"),
        pytest.param("import socket; socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)", id="unix socket"),
        pytest.param("import os; os.fork()", id="fork"),
        pytest.param("import os; os.kill(os.getppid(), 0)", id="signal the worker"),
        pytest.param("import os; os.listdir('/')", id="list a directory"),
    ],
)
def test_after_an_escape_files_sockets_and_processes_are_refused(escaped: ForkServer, code: str) -> None:
    refused(escaped, code)


def test_limits_cannot_be_changed_even_downwards(escaped: ForkServer) -> None:
    # prlimit64 is outside the allow-list: EPERM, which Python reports as ValueError for setrlimit.
    refused(escaped, "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (4, 8))", error="ValueError")


def test_threads_cannot_be_started(escaped: ForkServer) -> None:
    # clone() -> EPERM: "can't start new thread"
    refused(escaped, "import threading; threading.Thread(target=print).start()", error="RuntimeError")


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("import os; os.execv('/bin/sh', ['sh', '-c', 'true'])", id="execve"),
        pytest.param("import ctypes, os; ctypes.CDLL(None).ptrace(16, os.getppid(), 0, 0)", id="ptrace attach"),
        pytest.param("import ctypes; ctypes.CDLL(None).unshare(0x20000)", id="unshare mount namespace"),
        pytest.param("import ctypes; ctypes.CDLL(None).mount(b'none', b'/tmp', b'tmpfs', 0, None)", id="mount"),
    ],
)
def test_escape_class_system_calls_kill_the_process(escaped: ForkServer, code: str) -> None:
    outcome = escape(escaped, code)
    assert outcome.error is not None and "SIGSYS" in outcome.error["message"], outcome
    assert [(i.layer, i.reason) for i in outcome.incidents] == [("seccomp", "seccomp_kill")]


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop applies when the worker runs as root")
def test_user_code_runs_as_nobody(escaped: ForkServer) -> None:
    outcome = escape(escaped, "import os\nresult = float(len({os.getuid(), os.geteuid(), os.getgid(), os.getegid()}))"
                     "\nresult = os.geteuid() if result == 1 else -1")  # fmt: skip
    assert outcome.value == NOBODY


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)", id="mmap executable"),
        pytest.param(
            "import ctypes, mmap\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "buf = mmap.mmap(-1, 4096)\n"
            "address = ctypes.addressof(ctypes.c_char.from_buffer(buf))\n"
            "if libc.mprotect(ctypes.c_void_p(address), 4096, 7) != 0:\n"
            "    raise PermissionError(ctypes.get_errno(), 'mprotect refused')",
            id="mprotect to executable",
        ),
    ],
)
def test_no_memory_can_be_made_executable(escaped: ForkServer, code: str) -> None:
    refused(escaped, code)


def test_plain_memory_still_works_after_the_filter(escaped: ForkServer) -> None:
    outcome = escape(escaped, "import mmap\nm = mmap.mmap(-1, 1 << 20)\nm[:5] = b'hello'\nresult = len(m[:5].decode())")
    assert outcome.value == 5


def test_no_network_at_all_even_before_the_filter(escaped: ForkServer) -> None:
    """The zygote's network namespace holds for its children: no interface but a loopback that is down."""
    outcome = escape(escaped, "import socket\nresult = float(len(socket.if_nameindex()))")
    assert outcome.error is not None  # if_nameindex needs a socket: refused by the filter first
    assert SANDBOX_LAYERS["network_namespace"] is True
