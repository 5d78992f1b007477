"""seccomp: the system calls a read-only pool worker may not make, where Landlock stops (issue 27).

Landlock (``governor.workers.sandbox``) refuses writes by path. It does not see calls that
change state without writing a file: a mode, an owner, a time stamp or an xattr changed
on a file the step may only read; ``flock`` on a read-only descriptor; SysV shared
memory; the host name; raw, packet or MPTCP sockets (its TCP rule matches ``IPPROTO_TCP``
only); resource limits, priorities or CPUs set on *another* process (the supervisor dies
of an ``RLIMIT_CPU`` a step set); keystrokes pushed into a terminal (``TIOCSTI``). This
filter refuses those with ``EPERM`` and allows everything else::

    template:    Filter.build() ──> the BPF program, once (the worker's pid left open)
    pool worker: sandbox.apply() ──> Landlock ──> Filter.load(own pid)
                 ──> seccomp(SET_MODE_FILTER, TSYNC): every thread, and every process it starts

The calls refused, by what their arguments allow us to check (a seccomp filter sees the
registers, never the memory a pointer names, so no path can be checked):

- always: the ``chmod``/``chown``/``utime``/``*xattr`` families (even inside the private
  temp dir and the declared paths: a pool step that must set a mode belongs in the
  critical lane), ``flock`` (``LOCK_EX`` needs no write access), SysV IPC (all but
  ``shmdt``), ``sethostname``, ``setdomainname``, and the administrator's calls (mount, reboot, modules, clocks, ...);
- by argument: ``fcntl(F_SETLEASE)`` (a read lease on a read-only descriptor holds every
  writer of the file off for 45 s); ``ioctl`` ``TIOCSTI`` and ``TIOCLINUX``;
  ``socket`` but AF_UNIX, AF_NETLINK route, and AF_INET/AF_INET6 stream with protocol 0
  or TCP (datagram with 0 or UDP too, for a step that declared ``network=True``: without
  it, Landlock refuses TCP, and UDP, which Landlock cannot see before ABI 10, is refused
  here); ``socketpair`` but AF_UNIX; ``prlimit64``,
  ``sched_setaffinity``, ``sched_setscheduler``, ``sched_setparam``, ``sched_setattr``,
  ``setpriority`` and ``ioprio_set`` on any process but the caller (pid 0 or its own);
- not refused: ``fcntl`` record locks. Their write lock needs a descriptor open for
  writing, which Landlock grants only beneath the writable paths; the read lock is what
  every reader of an SQLite database takes (refusing it broke reading any WAL database);
- on x86-64, every call of another ABI (i386 ``int 0x80``, x32), which the numbers below
  would not match.

Why our own BPF and not a binding: pyseccomp (PyPI, ctypes over libseccomp) was last
released in 2021, libseccomp cannot say "refuse ``socket`` unless the triple is one of
these" without a rule per refused value, and the program is ~160 instructions, built once
in the template, checked here against the real kernel (tests/workers/test_sandbox_attacks.py).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import platform
import struct
from typing import Dict, Iterator, List, Optional, Tuple

import attrs

from governor.workers import libc

# -- the kernel's constants ----------------------------------------------------------

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000

# Classic BPF opcodes: load a word of seccomp_data, compare, mask, return.
_LD_ABS = 0x20   # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15      # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35      # BPF_JMP | BPF_JGE | BPF_K
_AND = 0x54      # BPF_ALU | BPF_AND | BPF_K
_RET = 0x06      # BPF_RET | BPF_K

# struct seccomp_data: nr, arch, instruction pointer, then six 64-bit arguments. Every
# argument checked here is a C int or unsigned int, which the kernel truncates to its low
# 32 bits, so the low word (first, on these little-endian machines) is the whole value.
_NR, _ARCH = 0, 4


def _arg(index: int) -> int:
    return 16 + 8 * index


AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
SOCK_STREAM, SOCK_DGRAM, SOCK_TYPE_MASK = 1, 2, 0xF
IPPROTO_TCP, IPPROTO_UDP = 6, 17
NETLINK_ROUTE = 0
PRIO_PROCESS, IOPRIO_WHO_PROCESS = 0, 1
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
F_SETLEASE = 1024

#: Calls refused whatever their arguments, by group (the group names the report's "why").
DENIED_GROUPS = {
    "metadata": ("chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
                 "utime", "utimes", "futimesat", "utimensat", "setxattr", "lsetxattr", "fsetxattr",
                 "setxattrat", "removexattr", "lremovexattr", "fremovexattr", "removexattrat"),
    "locks": ("flock",),
    "sysv_ipc": ("shmget", "shmat", "shmctl", "semget", "semop", "semctl", "semtimedop",
                 "msgget", "msgsnd", "msgrcv", "msgctl"),
    "host": ("sethostname", "setdomainname", "mount", "umount2", "pivot_root", "chroot", "swapon",
             "swapoff", "reboot", "kexec_load", "kexec_file_load", "init_module", "finit_module",
             "delete_module", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "acct",
             "iopl", "ioperm", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
             "mount_setattr"),
}

#: Calls whose first argument is a pid: allowed on 0 (the caller) or the caller's pid only.
SELF_ONLY = ("prlimit64", "sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr")


@attrs.frozen
class Arch:
    """One machine's numbers: its ``AUDIT_ARCH_*`` value and its system call table."""

    audit: int
    numbers: Dict[str, int]
    #: Calls numbered from here belong to another ABI on the same arch (x86-64's x32).
    foreign_from: Optional[int] = None


#: The machines this filter knows; any other gets no filter (``sandbox="auto"`` says so).
#: From the kernel's arch/x86/entry/syscalls/syscall_64.tbl (fchmodat2 6.6, *xattrat 6.13:
#: on an older kernel a number it does not have is never called, so matching it is harmless).
ARCHES = {
    "x86_64": Arch(0xC000003E, {
        "ioctl": 16, "shmget": 29, "shmat": 30, "shmctl": 31, "socket": 41, "socketpair": 53,
        "semget": 64, "semop": 65, "semctl": 66, "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71,
        "fcntl": 72, "flock": 73, "chmod": 90, "fchmod": 91, "chown": 92, "fchown": 93, "lchown": 94,
        "utime": 132, "setpriority": 141, "sched_setparam": 142, "sched_setscheduler": 144,
        "pivot_root": 155, "adjtimex": 159, "chroot": 161, "acct": 163, "settimeofday": 164, "mount": 165,
        "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170,
        "setdomainname": 171, "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176,
        "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197, "lremovexattr": 198,
        "fremovexattr": 199, "sched_setaffinity": 203, "semtimedop": 220, "clock_settime": 227,
        "utimes": 235, "kexec_load": 246, "ioprio_set": 251, "fchownat": 260, "futimesat": 261,
        "fchmodat": 268, "utimensat": 280, "prlimit64": 302, "clock_adjtime": 305, "finit_module": 313,
        "sched_setattr": 314, "seccomp": 317, "kexec_file_load": 320, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "fchmodat2": 452, "setxattrat": 463, "removexattrat": 466,
    }, foreign_from=0x40000000),
}

# A jump target, resolved when the program is assembled; _PID stands for the worker's pid.
_ALLOW, _DENY = "allow", "deny"
_PID = object()


class _Assembler:
    """Classic BPF with named labels: ``jump`` takes the labels of its true and false
    branches (``None``: the next instruction), :meth:`program` resolves them."""

    def __init__(self) -> None:
        self._code: List[tuple] = []
        self._labels: Dict[str, int] = {}

    def label(self, name: str) -> None:
        self._labels[name] = len(self._code)

    def load(self, offset: int) -> None:
        self._code.append((_LD_ABS, None, None, offset))

    def mask(self, bits: int) -> None:
        self._code.append((_AND, None, None, bits))

    def jump(self, value: object, true: Optional[str], false: Optional[str] = None, op: int = _JEQ) -> None:
        self._code.append((op, true, false, value))

    def ret(self, value: int) -> None:
        self._code.append((_RET, None, None, value))

    def program(self) -> Tuple[bytes, Tuple[int, ...]]:
        """The packed ``struct sock_filter`` array, and the byte offsets of every ``_PID``."""
        out, pid_at = bytearray(), []
        for index, (op, true, false, value) in enumerate(self._code):
            if value is _PID:
                pid_at.append(len(out) + 4)
                value = 0
            out += struct.pack("=HBBI", op, self._offset(index, true), self._offset(index, false), value)
        return bytes(out), tuple(pid_at)

    def _offset(self, index: int, label: Optional[str]) -> int:
        if label is None:
            return 0
        offset = self._labels[label] - index - 1
        if not 0 <= offset <= 255:  # a BPF jump is forward and fits a byte
            raise ValueError(f"jump to {label} from {index} out of range")
        return offset


#: A search ends in a row of equality tests once it is down to this many numbers.
_LEAF_SIZE = 4


def _search(asm: _Assembler, entries: List[Tuple[int, str]], names: Iterator[int]) -> None:
    """Jump to the label of the system call number loaded, by binary search over ``entries``
    (sorted ``(number, label)``); allow a number not among them.

    A search of ~85 numbers takes at most ~9 comparisons, where a row of them took up to
    85: the kernel runs the filter on every call that its per-number cache cannot settle,
    and runs it for every number of every ABI when the filter is loaded, to build that
    cache (160 us per worker with the row, here).
    """
    if len(entries) <= _LEAF_SIZE:
        for number, label in entries:
            asm.jump(number, label)
        asm.ret(SECCOMP_RET_ALLOW)
        return
    middle = len(entries) // 2
    upper = f"search-{next(names)}"
    asm.jump(entries[middle][0], upper, None, op=_JGE)
    _search(asm, entries[:middle], names)
    asm.label(upper)
    _search(asm, entries[middle:], names)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Filter:
    """The pool workers' seccomp program, built once (:meth:`build`), loaded in each worker.

    Everything :meth:`load` passes to the kernel is made here, in the template: in a fresh
    fork, making a ctypes array type and its buffer cost a worker ~0.4 ms of copy-on-write
    faults; writing its pid into the ready buffer costs it one.

    Attributes:
        program: the packed BPF instructions, with 0 where the worker's pid goes.
        pid_offsets: where in ``program`` the pid goes.
        syscall: the ``seccomp`` system call's number on this machine.
    """

    def __init__(self, program: bytes, pid_offsets: Tuple[int, ...], syscall: int):
        self.program, self.pid_offsets, self.syscall = program, pid_offsets, syscall
        self._buffer = ctypes.create_string_buffer(program, len(program))
        self._fprog = _SockFprog(len(program) // 8, ctypes.addressof(self._buffer))
        self._arguments = (ctypes.c_long(syscall), ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
                           ctypes.c_uint(SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(self._fprog))

    @classmethod
    def build(cls, machine: Optional[str] = None, datagrams: bool = True) -> Optional["Filter"]:
        """The filter for ``machine`` (default: this one), or ``None`` where it has no table.

        Args:
            datagrams: allow UDP sockets (AF_INET/AF_INET6 datagram; the policy's ``network``).
        """
        arch = ARCHES.get(machine or platform.machine())
        if arch is None:
            return None
        numbers = arch.numbers
        asm = _Assembler()
        asm.load(_ARCH)
        asm.jump(arch.audit, None, _DENY)
        asm.load(_NR)
        if arch.foreign_from is not None:
            asm.jump(arch.foreign_from, _DENY, None, op=_JGE)
        branches = {"socket": "socket", "socketpair": "socketpair", "ioctl": "ioctl", "fcntl": "fcntl",
                    "setpriority": "setpriority", "ioprio_set": "ioprio_set",
                    **{name: "self_only" for name in SELF_ONLY},
                    **{name: _DENY for group in DENIED_GROUPS.values() for name in group}}
        _search(asm, sorted((numbers[name], label) for name, label in branches.items()), itertools.count())

        asm.label("self_only")  # arg 0 is a pid
        asm.load(_arg(0))
        asm.jump(0, _ALLOW)
        asm.jump(_PID, _ALLOW, _DENY)
        for label, which in (("setpriority", PRIO_PROCESS), ("ioprio_set", IOPRIO_WHO_PROCESS)):
            asm.label(label)  # (which, who): a process, and that one the caller
            asm.load(_arg(0))
            asm.jump(which, None, _DENY)
            asm.load(_arg(1))
            asm.jump(0, _ALLOW)
            asm.jump(_PID, _ALLOW, _DENY)
        asm.label("ioctl")
        asm.load(_arg(1))
        asm.jump(TIOCSTI, _DENY)
        asm.jump(TIOCLINUX, _DENY, _ALLOW)
        asm.label("fcntl")
        asm.load(_arg(1))
        asm.jump(F_SETLEASE, _DENY, _ALLOW)
        asm.label("socketpair")
        asm.load(_arg(0))
        asm.jump(AF_UNIX, _ALLOW, _DENY)
        asm.label("socket")
        asm.load(_arg(0))
        asm.jump(AF_UNIX, _ALLOW)
        asm.jump(AF_INET, "inet")
        asm.jump(AF_INET6, "inet")
        asm.jump(AF_NETLINK, None, _DENY)
        asm.load(_arg(2))
        asm.jump(NETLINK_ROUTE, _ALLOW, _DENY)
        asm.label("inet")  # the type carries SOCK_CLOEXEC / SOCK_NONBLOCK above its low bits
        asm.load(_arg(1))
        asm.mask(SOCK_TYPE_MASK)
        if datagrams:
            asm.jump(SOCK_STREAM, "inet_protocol")
            asm.jump(SOCK_DGRAM, None, _DENY)
        else:
            asm.jump(SOCK_STREAM, None, _DENY)
        asm.label("inet_protocol")
        asm.load(_arg(2))
        asm.jump(0, _ALLOW)
        asm.jump(IPPROTO_TCP, _ALLOW)
        asm.jump(IPPROTO_UDP, _ALLOW, _DENY)

        asm.label(_ALLOW)
        asm.ret(SECCOMP_RET_ALLOW)
        asm.label(_DENY)
        asm.ret(SECCOMP_RET_ERRNO | errno.EPERM)
        program, pid_offsets = asm.program()
        return cls(program, pid_offsets, numbers["seccomp"])

    def load(self, pid: int) -> None:
        """Hold this process (every thread: TSYNC) and all it starts to the filter, for life.

        Sets ``no_new_privs`` first, which the kernel demands of an unprivileged caller.

        Raises:
            OSError: the kernel refused (``EINVAL``: no seccomp filters in this kernel).
        """
        for offset in self.pid_offsets:
            struct.pack_into("=I", self._buffer, offset, pid)
        libc.no_new_privs()
        if libc.libc.syscall(*self._arguments) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"seccomp(SET_MODE_FILTER): {os.strerror(code)}")


def unavailable() -> Optional[str]:
    """Why this machine cannot hold a worker to the filter, or ``None`` when it can."""
    arch = ARCHES.get(platform.machine())
    if libc.libc is None or arch is None:
        return f"seccomp (no system call table for {platform.system()} {platform.machine()})"
    action = ctypes.c_uint32(SECCOMP_RET_ERRNO)
    if libc.libc.syscall(ctypes.c_long(arch.numbers["seccomp"]), ctypes.c_uint(SECCOMP_GET_ACTION_AVAIL),
                         ctypes.c_uint(0), ctypes.byref(action)) != 0:
        return f"seccomp (the kernel offers no filters: {os.strerror(ctypes.get_errno())})"
    return None
