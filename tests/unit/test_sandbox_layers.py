"""The process layers, each tested as if the language layer had already failed.

Each test starts a real interpreter, applies exactly the sandbox child's confinement (``confine``: resource
limits, network namespace, no_new_privs, unprivileged uid, seccomp) and then runs *unrestricted* Python:
what an attacker would have after a RestrictedPython escape. The kernel must still refuse.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest

from shared.infra.config import SandboxLimits
from shared.sandbox.child import NOBODY

PROJECT_ROOT = Path(__file__).resolve().parents[2]

_HARNESS = """
import json, os, sys
import mmap, resource, socket, threading  # loaded before the filter, as an escaped script would find them
sys.path.insert(0, sys.argv[1])
from shared.sandbox.child import confine
layers = confine(json.loads(sys.argv[2]), 1)
def report(**fields):
    os.write(1, (json.dumps({"layers": layers, **fields}) + "\\n").encode())
try:
    exec(compile(sys.argv[3], "<escape>", "exec"), {"report": report})
except BaseException as exc:
    report(raised=type(exc).__name__, message=str(exc)[:300])
"""


def escape(code: str) -> tuple[int, dict[str, object]]:
    """Run ``code`` unrestricted inside a confined process: (exit status, last report)."""
    limits = json.dumps(asdict(SandboxLimits(symbol_timeout_s=5, memory_mb=512)))
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _HARNESS, str(PROJECT_ROOT), limits, textwrap.dedent(code)],
        capture_output=True,
        env={},
        cwd="/",
        timeout=60,
        check=False,
    )
    lines = proc.stdout.decode().strip().splitlines()
    return proc.returncode, (json.loads(lines[-1]) if lines else {})


def refused(code: str, error: str = "PermissionError") -> dict[str, object]:
    status, report = escape(code)
    assert status == 0, f"process died with {status}"
    assert report.get("raised") == error, report
    assert report["layers"] == {
        "network_namespace": True,
        "no_new_privs": True,
        "unprivileged_uid": True,
        "seccomp": True,
    }
    return report


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
def test_after_an_escape_files_sockets_and_processes_are_refused(code: str) -> None:
    refused(code)


def test_limits_cannot_be_changed_even_downwards() -> None:
    # prlimit64 is outside the allow-list: EPERM, which Python reports as ValueError for setrlimit.
    refused("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (4, 8))", error="ValueError")


def test_threads_cannot_be_started() -> None:
    status, report = escape("import threading; threading.Thread(target=print).start()")
    assert status == 0 and report["raised"] == "RuntimeError"  # clone() -> EPERM: "can't start new thread"


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("import os; os.execv('/bin/sh', ['sh', '-c', 'true'])", id="execve"),
        pytest.param("import ctypes, os; ctypes.CDLL(None).ptrace(16, os.getppid(), 0, 0)", id="ptrace attach"),
        pytest.param("import ctypes; ctypes.CDLL(None).unshare(0x20000)", id="unshare mount namespace"),
        pytest.param("import ctypes; ctypes.CDLL(None).mount(b'none', b'/tmp', b'tmpfs', 0, None)", id="mount"),
    ],
)
def test_escape_class_system_calls_kill_the_process(code: str) -> None:
    status, report = escape(code)
    assert status == -signal.SIGSYS, (status, report)


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop applies when the worker runs as root")
def test_user_code_runs_as_nobody() -> None:
    status, report = escape("import os; report(ids=[os.getuid(), os.geteuid(), os.getgid(), os.getegid()])")
    assert status == 0 and report["ids"] == [NOBODY, NOBODY, NOBODY, NOBODY]


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
def test_no_memory_can_be_made_executable(code: str) -> None:
    refused(code)


def test_plain_memory_still_works_after_the_filter() -> None:
    status, report = escape("import mmap; m = mmap.mmap(-1, 1 << 20); m[:5] = b'hello'; report(ok=m[:5].decode())")
    assert status == 0 and report["ok"] == "hello"
