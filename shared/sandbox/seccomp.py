"""The seccomp layer of the sandbox process: a system-call allow-list installed after all imports.

Once loaded, the process can compute, allocate memory, read and write the descriptors it already has and
exit; nothing else. Calls that only an escape attempt would make (executing programs, tracing, mounting,
namespaces, kernel modules, BPF, ...) kill the process at once (SIGSYS, reported as a security event);
every other call outside the allow-list (opening files, sockets, new processes or threads, signals to
other processes, changing limits) fails with EPERM, which Python turns into an ordinary exception.

The filter is built with libseccomp (the system library every container runtime uses), called through
ctypes by its stable soname: no wrapper package, no ``ldconfig`` run. libseccomp also handles the architecture
checks (a foreign-ABI call, such as x32 on x86-64, kills the process). The sandbox zygote builds it once and
exports the BPF program (:meth:`Filter.export`); each forked child installs it with one ``prctl``
(:meth:`Program.install`, microseconds, where building and loading the filter cost milliseconds). Hosts without
libseccomp get no filter: the sandbox reports the layer inactive and the worker says so, never pretends.
"""

from __future__ import annotations

import ctypes
import errno
import os

# What CPython needs to run already-imported pure-Python code on data it holds: memory, the existing
# descriptors (its result pipe, /dev/null), time, signals to itself, and exit.
ALLOWED = (
    "read", "write", "readv", "writev", "pread64", "close", "lseek", "fstat", "newfstatat", "fcntl",
    "dup", "dup2", "dup3", "poll", "ppoll", "select", "pselect6",
    "brk", "munmap", "mremap", "madvise", "futex", "set_robust_list", "rseq",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall",
    "clock_gettime", "clock_getres", "gettimeofday", "time", "nanosleep", "clock_nanosleep",
    "getrandom", "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getrusage",
    "times", "sched_yield", "sched_getaffinity", "uname", "getcwd", "exit", "exit_group",
)  # fmt: skip

# Allowed only for memory that is not executable (``prot``, argument 2 of both, without PROT_EXEC): after a
# memory-corruption bug there is still nowhere to put machine code. (mmap/mprotect of PROT_EXEC -> EPERM.)
NO_EXEC_MEMORY = ("mmap", "mprotect")
_PROT_EXEC = 0x4

# Calls with no innocent use here: the process is killed on the spot.
KILLED = (
    "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig",
    "fspick", "mount_setattr", "unshare", "setns", "bpf", "perf_event_open", "userfaultfd",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "acct", "keyctl", "add_key", "request_key", "personality", "iopl", "ioperm",
    "open_by_handle_at", "name_to_handle_at", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "syslog", "quotactl", "vhangup",
)  # fmt: skip


_SCMP_ACT_KILL_PROCESS = 0x80000000
_SCMP_ACT_ALLOW = 0x7FFF0000
_NR_UNKNOWN = -1  # __NR_SCMP_ERROR: a name this kernel/architecture does not have
_SCMP_CMP_MASKED_EQ = 7


class _ArgCmp(ctypes.Structure):
    """libseccomp's ``struct scmp_arg_cmp``: (argument & datum_a) == datum_b for MASKED_EQ."""

    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0x0000FFFF)


def _find_libseccomp() -> str | None:
    import ctypes.util  # slow (runs ldconfig): only when the usual soname is missing

    return ctypes.util.find_library("seccomp")


def _load_libseccomp() -> ctypes.CDLL | None:
    for find in (lambda: "libseccomp.so.2", _find_libseccomp):
        name = find()
        if name:
            try:
                lib = ctypes.CDLL(name, use_errno=True)
            except OSError:
                continue
            lib.seccomp_init.argtypes = [ctypes.c_uint32]
            lib.seccomp_init.restype = ctypes.c_void_p
            lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
            lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
            lib.seccomp_rule_add_array.argtypes = [
                ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)
            ]  # fmt: skip
            lib.seccomp_rule_add_array.restype = ctypes.c_int
            lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
            lib.seccomp_export_bpf.restype = ctypes.c_int
            lib.seccomp_release.argtypes = [ctypes.c_void_p]
            lib.seccomp_release.restype = None
            return lib
    return None


class Filter:
    """Built once by the zygote, before anything is limited; exported for the children to install."""

    def __init__(self) -> None:
        self._lib = _load_libseccomp()
        self._ctx: int | None = None
        if self._lib is None:  # no libseccomp on this host
            return
        ctx = self._lib.seccomp_init(_scmp_act_errno(errno.EPERM))
        if not ctx:
            return
        ok = True  # (a forked child has one thread: the filter needs no thread sync)
        no_exec = (_ArgCmp * 1)(_ArgCmp(2, _SCMP_CMP_MASKED_EQ, _PROT_EXEC, 0))
        rules: list[tuple[int, str, ctypes.Array[_ArgCmp] | None]] = [(_SCMP_ACT_ALLOW, name, None) for name in ALLOWED]
        rules += [(_SCMP_ACT_ALLOW, name, no_exec) for name in NO_EXEC_MEMORY]
        rules += [(_SCMP_ACT_KILL_PROCESS, name, None) for name in KILLED]
        for action, name, conditions in rules:
            number = self._lib.seccomp_syscall_resolve_name(name.encode())
            if number != _NR_UNKNOWN:
                count = len(conditions) if conditions is not None else 0
                ok = ok and self._lib.seccomp_rule_add_array(ctx, action, number, count, conditions) == 0
        if ok:
            self._ctx = ctx
        else:
            self._lib.seccomp_release(ctx)

    def export(self) -> bytes | None:
        """The filter as a BPF program (``struct sock_filter`` entries, 8 bytes each), or None when the host
        cannot build one. Releases the libseccomp context."""
        if self._lib is None or self._ctx is None:
            return None
        read_end, write_end = os.pipe()
        try:
            exported = self._lib.seccomp_export_bpf(self._ctx, write_end) == 0
            os.close(write_end)
            write_end = -1
            chunks = []
            while chunk := os.read(read_end, 65536):
                chunks.append(chunk)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
            self._lib.seccomp_release(self._ctx)
            self._ctx = None
        program = b"".join(chunks)
        return program if exported and program and len(program) % _SOCK_FILTER_SIZE == 0 else None


_SOCK_FILTER_SIZE = 8
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Program:
    """An exported filter, made ready to install before the fork: a child's :meth:`install` is one ``prctl``."""

    def __init__(self, program: bytes | None) -> None:
        self._buffer = ctypes.create_string_buffer(program or b"", len(program or b""))
        self._fprog = _SockFprog(len(program or b"") // _SOCK_FILTER_SIZE, ctypes.cast(self._buffer, ctypes.c_void_p))
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl
        self._prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
        self._prctl.restype = ctypes.c_int
        self.available = bool(program)

    def install(self) -> bool:
        """Install the filter into this process (no_new_privs must be set first). False when there is no program
        or the kernel refuses it."""
        if not self.available:
            return False
        return bool(self._prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(self._fprog), 0, 0) == 0)
