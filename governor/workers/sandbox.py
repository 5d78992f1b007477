"""Landlock and seccomp: hold a pool worker to read-only, for the rest of its life (issues 17, 27).

The pool lane's promise is that its steps only read. :func:`apply` makes the kernel keep
it: the calling process may read everything, but may write only beneath a private
per-worker temp directory, to ``/dev/null`` and to the paths its steps declared; where the
kernel's ABI allows it, it may also not bind or connect TCP (unless a step declared
network use) and may not signal processes outside its own tree, nor connect to abstract
Unix sockets created outside it. A seccomp filter (``governor.workers.seccomp``) then
refuses what Landlock does not see: metadata changes, locks, SysV IPC, raw/packet/MPTCP
sockets, limits and priorities set on other processes, ``TIOCSTI``. Rules stay with the
process and every process it starts for life: there is no undo, so it is applied only in
a forked pool worker.

Data flow::

    supervisor:  policy_for(pool specs, sandbox_writes) ──> SandboxPolicy ──> (to the worker)
    template:    prepare(policy) ──> the seccomp filter, built once
    pool worker: apply(policy) ──> Landlock, then seccomp
                 ──> SandboxReport ("landlock-v7+seccomp" / "none", what was missing)
                 step raises ──> denied_write(exc, report) ──> path ──> ReadOnlyViolation
                                 (governor.workers.denials)

How :func:`apply` restricts (kernel ABIs: 1 = 5.13, 2 = 5.19, 3 = 6.2, 4 = 6.7, 5 = 6.10,
6 = 6.12, 7 = 6.15)::

    landlock_create_ruleset(NULL, 0, VERSION) ──> ABI  (0: none; the report says "none")
    ruleset handles every write-ish right the ABI knows (never read/execute: reads stay free),
        TCP bind+connect (ABI >= 4, unless network), signal + abstract-socket scope (ABI >= 6)
    add_rule(PATH_BENEATH) for: private temp dir, declared paths (all write rights);
        /dev/null and declared files (file rights only: a directory right on a file is EINVAL)
    prctl(PR_SET_NO_NEW_PRIVS) ──> landlock_restrict_self(ruleset)

Why our own ctypes layer and not a binding from PyPI: of the three published
(``landlock`` 1.0.0.dev5: alpha, filesystem rights only, no network or scope fields;
``py-landlock`` 0.1.1: alpha; ``landlockpy`` 0.2.0: beta, three months old, one vendor,
tests not shipped), none is mature enough to sit in Governor's core dependencies, and the
part Governor needs is three syscalls and one prctl, tested here against the real kernel.

Landlock restricts the calling *thread* and the threads and processes it creates
afterwards (ABI < 8 has no way to reach sibling threads), so call :func:`apply` before
starting any thread that runs step code; the report counts the threads left unrestricted.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import platform
import tempfile
from collections.abc import Iterable
from typing import Any, Dict, Optional

import attrs

from governor.workers import denials
from governor.workers import libc
from governor.workers import seccomp
from governor.errors import SandboxUnavailable

#: The three Landlock syscalls (create_ruleset, add_rule, restrict_self) per machine.
#: They were added to the unified syscall table, so x86-64 and aarch64 share the numbers;
#: an architecture not listed here gets no sandbox rather than a guessed number.
SYSCALLS = {
    "x86_64": (444, 445, 446),
    "aarch64": (444, 445, 446),
}

#: Indexes into a :data:`SYSCALLS` entry.
CREATE_RULESET, ADD_RULE, RESTRICT_SELF = range(3)

LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1


class FsAccess(enum.IntFlag):
    """The file system rights Landlock can handle (``LANDLOCK_ACCESS_FS_*``)."""

    EXECUTE = 1 << 0
    WRITE_FILE = 1 << 1
    READ_FILE = 1 << 2
    READ_DIR = 1 << 3
    REMOVE_DIR = 1 << 4
    REMOVE_FILE = 1 << 5
    MAKE_CHAR = 1 << 6
    MAKE_DIR = 1 << 7
    MAKE_REG = 1 << 8
    MAKE_SOCK = 1 << 9
    MAKE_FIFO = 1 << 10
    MAKE_BLOCK = 1 << 11
    MAKE_SYM = 1 << 12
    REFER = 1 << 13       # ABI 2: link or rename into another directory
    TRUNCATE = 1 << 14    # ABI 3
    IOCTL_DEV = 1 << 15   # ABI 5: ioctl on a device file


class NetAccess(enum.IntFlag):
    """``LANDLOCK_ACCESS_NET_*`` (ABI 4)."""

    BIND_TCP = 1 << 0
    CONNECT_TCP = 1 << 1


class SandboxScope(enum.IntFlag):
    """``LANDLOCK_SCOPE_*`` (ABI 6)."""

    ABSTRACT_UNIX_SOCKET = 1 << 0
    SIGNAL = 1 << 1


#: Every right that changes the file system, with the ABI that introduced it. Reading and
#: executing are never handled, so they stay allowed everywhere.
WRITE_RIGHTS_SINCE_ABI = (
    (1, FsAccess.WRITE_FILE | FsAccess.REMOVE_DIR | FsAccess.REMOVE_FILE | FsAccess.MAKE_CHAR
     | FsAccess.MAKE_DIR | FsAccess.MAKE_REG | FsAccess.MAKE_SOCK | FsAccess.MAKE_FIFO
     | FsAccess.MAKE_BLOCK | FsAccess.MAKE_SYM),
    (2, FsAccess.REFER),
    (3, FsAccess.TRUNCATE),
    (5, FsAccess.IOCTL_DEV),
)

#: The only rights a rule on a file (not a directory) may carry.
FILE_RIGHTS = FsAccess.WRITE_FILE | FsAccess.TRUNCATE | FsAccess.IOCTL_DEV

NETWORK_ABI = 4
SCOPE_ABI = 6

#: Newest ABI this module knows; a newer kernel is used at this level (Landlock is
#: backward compatible), so the label says what was applied, not what the kernel has.
KNOWN_ABI = 7

#: Writable for every sandboxed worker: programs (git among them) open it to discard output.
DEV_NULL = os.devnull


class _RulesetAttr(ctypes.Structure):
    # struct landlock_ruleset_attr up to ABI 6; a kernel older than a field rejects a
    # non-zero value, so the size passed is cut to the fields the ABI knows.
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct is packed: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def handled_write_rights(abi: int) -> FsAccess:
    """The write rights a ruleset handles (denies unless granted) under ``abi``."""
    rights = FsAccess(0)
    for since, added in WRITE_RIGHTS_SINCE_ABI:
        if abi >= since:
            rights |= added
    return rights


# What apply() passes, as plain ints made once at import (in the process that forks the
# workers): composing IntFlag members costs milliseconds the first time in each process.
_HANDLED_FS = tuple(int(handled_write_rights(abi)) for abi in range(KNOWN_ABI + 1))
_FILE_RIGHTS = int(FILE_RIGHTS)
_HANDLED_NET = int(NetAccess.BIND_TCP | NetAccess.CONNECT_TCP)
_SCOPED = int(SandboxScope.SIGNAL | SandboxScope.ABSTRACT_UNIX_SOCKET)


def _attr_size(abi: int) -> int:
    if abi >= SCOPE_ABI:
        return ctypes.sizeof(_RulesetAttr)
    if abi >= NETWORK_ABI:
        return _RulesetAttr.scoped.offset
    return _RulesetAttr.handled_access_net.offset


def _syscall(index: int, *args: Any) -> int:
    """Run Landlock syscall ``index`` (:data:`CREATE_RULESET`, ...); raise ``OSError`` on failure."""
    numbers = SYSCALLS.get(platform.machine()) if libc.libc is not None else None
    if numbers is None:
        raise OSError(errno.ENOSYS, f"no Landlock syscall numbers for {platform.system()} {platform.machine()}")
    result = libc.libc.syscall(ctypes.c_long(numbers[index]), *args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def abi_version() -> int:
    """The kernel's Landlock ABI version, or 0 where there is none (old kernel, disabled, not Linux)."""
    try:
        return _syscall(CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    except OSError:
        return 0


def require() -> int:
    """The kernel's Landlock ABI version, for ``Supervisor(sandbox="require")``, once it is
    sure the kernel offers both Landlock and seccomp filters.

    Raises:
        SandboxUnavailable: this kernel offers no Landlock, or no seccomp filter.
    """
    kernel = f"this kernel ({platform.system()} {platform.release()}, {platform.machine()})"
    abi = abi_version()
    if abi < 1:
        raise SandboxUnavailable(
            f"sandbox='require', but {kernel} offers no Landlock: it needs Linux >= 5.13 with landlock "
            "in the lsm= boot list. Use sandbox='auto' to run the pool lane unsandboxed here.")
    why = seccomp.unavailable()
    if why is not None:
        raise SandboxUnavailable(
            f"sandbox='require', but {kernel} cannot hold the pool workers to the seccomp filter: {why}. "
            "Use sandbox='auto' to run the pool lane under Landlock alone here.")
    return abi


def _absolute(paths: Iterable[Any]) -> tuple[str, ...]:
    if isinstance(paths, (str, bytes)):
        raise TypeError(f"writable must be an iterable of paths, not a single {type(paths).__name__}")
    out = []
    for path in paths:
        text = os.fspath(path)
        if not isinstance(text, str) or not text:
            raise ValueError(f"a writable path must be a non-empty str path, got {path!r}")
        out.append(os.path.abspath(os.path.expanduser(text)))
    return tuple(dict.fromkeys(out))  # ordered, no duplicates


@attrs.frozen
class SandboxPolicy:
    """What a sandboxed worker may still do.

    Attributes:
        writable: paths the worker may write beneath (``~`` expanded, made absolute). A
            directory that does not exist is created before the rules apply (a step that
            declares ``~/.cache/app`` must be able to fill it on its first run).
        network: allow TCP bind and connect, and UDP (a pool step declared ``network=True``).
        scope_signals: deny signals to, and abstract Unix socket connections with,
            processes outside the worker's own tree (ABI >= 6).
        tmp_root: where the private per-worker temp directory is made (default: the
            system's temp directory); the supervisor owns it and removes it.
    """

    writable: tuple[str, ...] = attrs.field(default=(), converter=_absolute)
    network: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    scope_signals: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    tmp_root: Optional[str] = attrs.field(
        default=None, converter=attrs.converters.optional(lambda path: os.path.abspath(os.fspath(path))))


def policy_for(specs: Iterable[Any], writable: Iterable[Any] = (), *, scope_signals: bool = True,
               tmp_root: Optional[str] = None) -> SandboxPolicy:
    """The policy of a worker that may run any of ``specs`` (the pool lane's steps).

    A worker runs whichever pool step comes next, so its rules are the union of their
    declarations: every declared ``writes`` path, plus ``writable`` (the supervisor's
    ``sandbox_writes``); the network is allowed if any of them declared ``network=True``.
    """
    specs = list(specs)
    paths = [*writable, *(path for spec in specs for path in spec.writes)]
    return SandboxPolicy(paths, network=any(spec.network for spec in specs), scope_signals=scope_signals,
                         tmp_root=tmp_root)


@attrs.frozen
class SandboxReport:
    """What :func:`apply` did, for ``describe_workers()``, metrics and the log.

    Attributes:
        abi: the Landlock ABI applied (0: none).
        seccomp: whether the seccomp filter holds the process.
        tmpdir: the worker's private temp directory (``TMPDIR``), or ``None``.
        writable: the paths the worker may write beneath, temp dir and ``/dev/null`` included.
        missing: what the policy asked for and this kernel could not do, e.g.
            ``("tcp (needs Landlock ABI 4)",)``, or why there is no sandbox at all.
        unrestricted_threads: threads of the process that were already running and keep
            no rules (Landlock restricts the calling thread and what it starts later).
    """

    abi: int
    tmpdir: Optional[str] = None
    writable: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unrestricted_threads: int = 0
    seccomp: bool = False

    @property
    def applied(self) -> bool:
        """Whether Landlock rules hold this process."""
        return self.abi > 0

    @property
    def label(self) -> str:
        """``"landlock-v7+seccomp"``, ``"landlock-v7"``, ``"seccomp"`` or ``"none"``: the value
        of ``describe_workers()``'s ``sandbox``."""
        parts = ([f"landlock-v{self.abi}"] if self.applied else []) + (["seccomp"] if self.seccomp else [])
        return "+".join(parts) or "none"

    def __str__(self) -> str:
        missing = f"; not applied: {', '.join(self.missing)}" if self.missing else ""
        return f"sandbox {self.label}{missing}"


#: The seccomp program by the policy's ``network`` (UDP allowed or not), built once per process.
_seccomp_filters: Dict[bool, Optional[seccomp.Filter]] = {}


def _filter(network: bool) -> Optional[seccomp.Filter]:
    if network not in _seccomp_filters:
        _seccomp_filters[network] = seccomp.Filter.build(datagrams=network)
    return _seccomp_filters[network]


def prepare(policy: SandboxPolicy) -> None:
    """Work out, once in the process that forks the workers, what :func:`apply` needs in each.

    Python caches the default temp directory (``tempfile.gettempdir`` finds it by writing
    a probe file, 0.8 ms in a fresh fork here) and the machine name the syscall numbers
    are looked up by (0.1 ms); the seccomp program is assembled here too. Done before the
    fork, every worker inherits them.
    """
    if policy.tmp_root is None:
        tempfile.gettempdir()
    platform.machine()
    _filter(policy.network)


def apply(policy: SandboxPolicy) -> SandboxReport:
    """Restrict this process, for the rest of its life, to what ``policy`` allows.

    Makes the private temp directory first and points ``TMPDIR`` (and :mod:`tempfile`)
    at it, so steps that use temporary files keep working. Then Landlock, then the
    seccomp filter; where the kernel lacks one, the other still holds and the report
    says what is missing (``"none"`` and why when it lacks both).

    Returns:
        What was applied.

    Raises:
        OSError: a Landlock syscall failed on a kernel that has Landlock (a bug: report it).
    """
    abi = min(abi_version(), KNOWN_ABI)
    denials.watch()
    tmpdir = _private_tmpdir(policy.tmp_root)
    os.environ["TMPDIR"] = tmpdir
    tempfile.tempdir = tmpdir
    missing: list = []
    if abi >= 1:
        granted = _restrict(policy, abi, tmpdir, missing)
    else:
        granted = ()
        missing.append(f"landlock (the kernel offers none: {platform.release()})")
    held = _hold_to_seccomp(policy.network, missing)
    threads = len(os.listdir("/proc/self/task")) - 1
    return SandboxReport(abi, tmpdir, granted, tuple(missing), threads, held)


def _hold_to_seccomp(network: bool, missing: list) -> bool:
    """Load the seccomp filter; whether it holds (else why not is added to ``missing``)."""
    program = _filter(network)
    if program is None:
        missing.append(f"seccomp (no system call table for {platform.machine()})")
        return False
    try:
        program.load(os.getpid())
    except OSError as exc:  # EINVAL: a kernel built without seccomp filters
        missing.append(f"seccomp ({exc.strerror or exc})")
        return False
    return True


def _restrict(policy: SandboxPolicy, abi: int, tmpdir: str, missing: list) -> tuple[str, ...]:
    """Apply Landlock at ``abi``; the paths granted (what could not be is added to ``missing``)."""
    write_rights = _HANDLED_FS[abi]
    attr = _RulesetAttr(handled_access_fs=write_rights)
    if not policy.network:
        if abi >= NETWORK_ABI:
            attr.handled_access_net = _HANDLED_NET
        else:
            missing.append(f"tcp (needs Landlock ABI {NETWORK_ABI})")
    if policy.scope_signals:
        if abi >= SCOPE_ABI:
            attr.scoped = _SCOPED
        else:
            missing.append(f"signal scope (needs Landlock ABI {SCOPE_ABI})")
    ruleset = _syscall(CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(_attr_size(abi)), ctypes.c_uint32(0))
    granted = []
    try:
        for path in (tmpdir, DEV_NULL, *policy.writable):
            try:
                if not os.path.lexists(path):
                    os.makedirs(path, exist_ok=True)
                _allow(ruleset, path, write_rights)
            except OSError as exc:  # a declared path we cannot create: its writes will be denied
                missing.append(f"write {path} ({exc.strerror or exc})")
            else:
                granted.append(path)
        # landlock_restrict_self demands it of an unprivileged caller.
        libc.no_new_privs()
        _syscall(RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return tuple(granted)


def _private_tmpdir(root: Optional[str]) -> str:
    """A new directory only this process may use: ``ROOT/governor-worker-PID`` when ``root``
    is given and that name is free, else ``tempfile.mkdtemp``'s random name.

    ``mkdir`` makes it ours (mode 0700) or fails, whatever was there first (a directory, a
    symlink), so the plain name is safe even in a shared ``root``. It is the common case,
    in the supervisor's private directory, and it costs a fresh worker one syscall where
    ``mkdtemp`` cost it ~90 copy-on-write faults (reseeding its random names after the
    fork), ~0.6 ms on the bench's VM.
    """
    if root is not None:
        path = os.path.join(root, f"governor-worker-{os.getpid()}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:  # a worker before this one had the pid: a random name instead
            pass
        else:
            return path
    return tempfile.mkdtemp(prefix=f"governor-worker-{os.getpid()}-", dir=root)


def _allow(ruleset: int, path: str, rights: int) -> None:
    """Let the sandbox write beneath ``path`` (a file gets file rights only)."""
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not os.path.isdir(path):
            rights &= _FILE_RIGHTS
        rule = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
        _syscall(ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                 ctypes.c_uint32(0))
    finally:
        os.close(fd)


def denied_write(error: BaseException, report: SandboxReport) -> Optional[str]:
    """The path the sandbox refused a step, if that is why ``error`` happened
    (``governor.workers.denials``); ``None`` for the step's own error or where nothing
    holds the process. A metadata call the seccomp filter refused (in a writable path,
    so no denied write) gets a note on ``error`` saying why and what to do instead.
    """
    if not (report.applied or report.seccomp):
        return None
    denied = denials.denied_write(error, report.writable)
    if denied is None and report.seccomp:
        denials.note_metadata_refusal(error)
    return denied
