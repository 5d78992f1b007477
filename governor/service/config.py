"""How a daemon runs: its settings (:class:`DaemonConfig`), the metrics address they name,
and the steps it serves (:func:`load_registry`).

Light on purpose (attrs and the standard library): ``governor serve`` reads its options into
these before anything heavy is imported.
"""

from __future__ import annotations

import importlib
import ipaddress
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import attrs

from governor.errors import DaemonError, InitializerInvalid, MetricsAddressInvalid
from governor.paths import default_journal_path, default_socket_path
from governor.service.journal import JournalSync
from governor.service.live import HttpConfig

#: The entry-point group through which installed packages ship steps to the daemon. Each
#: entry point names a ``StepRegistry`` (its steps are included) or a callable taking the
#: daemon's registry (it registers steps on it).
ENTRY_POINT_GROUP = "governor.steps"

#: How many connections one user may hold open at once; the next is refused with
#: ``TooManyClients``. The peer check already limits clients to the daemon's own user (and
#: root, if allowed), so this bounds what one runaway program can hold; the idle timeout
#: frees what it leaked.
DEFAULT_MAX_CONNECTIONS_PER_UID = 256

#: How long a connection with nothing in flight may stay silent before it is closed. Long
#: enough for a program that keeps a client between bursts of work (it reconnects on its
#: next request anyway); short enough that leaked connections free their slots in minutes.
DEFAULT_IDLE_TIMEOUT_S = 300.0

#: How long running steps may take to finish after SIGTERM before they are cancelled
#: (they stay "running" in the journal, so the next start treats them as interrupted).
DEFAULT_DRAIN_TIMEOUT_S = 30.0

#: Where ``--metrics-addr PORT`` listens: loopback, since the figures name steps and hosts.
DEFAULT_METRICS_HOST = "127.0.0.1"


def parse_metrics_addr(text: str) -> Tuple[str, int]:
    """``(host, port)`` of a metrics address.

    Forms: ``PORT`` (on 127.0.0.1), ``HOST:PORT``, ``IPV4:PORT`` and ``[IPV6]:PORT``
    (e.g. ``[::1]:9468``). The port is 1-65535.

    Raises:
        MetricsAddressInvalid: any other text, saying which form was expected.
    """
    expected = "expected PORT, HOST:PORT or [IPV6]:PORT (e.g. 127.0.0.1:9464 or [::1]:9464)"
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise MetricsAddressInvalid(f"metrics address {text!r}: {expected}")
        port = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise MetricsAddressInvalid(f"metrics address {text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in text:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise MetricsAddressInvalid(f"metrics address {text!r}: put an IPv6 address in brackets, "
                                        f"e.g. [{host}]:{port}")
    else:
        host, port = DEFAULT_METRICS_HOST, text
    if not host:
        raise MetricsAddressInvalid(f"metrics address {text!r}: name the host ({DEFAULT_METRICS_HOST}:{port}, "
                                    f"or 0.0.0.0:{port} for every interface)")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise MetricsAddressInvalid(f"metrics address {text!r}: the port must be a number from 1 to 65535; {expected}")
    return host, int(port)


def _metrics_addr(value: Union[None, str, Tuple[str, int]]) -> Optional[Tuple[str, int]]:
    if value is None or isinstance(value, tuple):
        return value
    return parse_metrics_addr(value)


def show_addr(addr: Tuple[str, int]) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_registry(modules: Sequence[str] = (), entry_points: bool = True, builtin: bool = True):
    """The daemon's steps: the built-in ones, those of ``modules``, and those of installed packages.

    Args:
        builtin: start from ``steps.builtin.default_registry()`` (else from an empty one).
        modules: ``MODULE`` or ``MODULE:ATTRIBUTE`` names; the attribute is a
            ``StepRegistry`` to include or a callable to call with the daemon's registry.
            Without one: the module's ``registry``, else the steps ``@governor.step``
            registered from the module.
        entry_points: also load the :data:`ENTRY_POINT_GROUP` entry points.
    """
    from governor.steps import StepRegistry
    from governor.steps.builtin import default_registry

    registry = default_registry() if builtin else StepRegistry()
    sources = [_load_attribute(name) for name in modules]
    if entry_points:
        sources += [entry.load() for entry in metadata.entry_points(group=ENTRY_POINT_GROUP)]
    for source in sources:
        if callable(getattr(source, "snapshot", None)):
            registry.include(source)
        elif callable(source):
            source(registry)
        else:
            raise DaemonError(f"a step source must be a StepRegistry or a callable, not {type(source).__name__}")
    return registry


def _load_attribute(name: str) -> Any:
    """The step source ``MODULE[:ATTR]`` names: ATTR; else the module's ``registry``; else the
    steps ``@governor.step`` registered from the module (or, for a package, its submodules).

    Raises:
        DaemonError: there is no such ATTR, or the module has neither a registry nor steps;
            the message says how to give it either.
    """
    module_name, _, attribute = name.partition(":")
    module = importlib.import_module(module_name)
    if attribute:
        try:
            return getattr(module, attribute)
        except AttributeError:
            raise DaemonError(f"module {module_name!r} has no {attribute!r}") from None
    if hasattr(module, "registry"):
        return module.registry
    from governor.steps import REGISTRY

    decorated = REGISTRY.only(lambda spec: _defined_in(spec.fn, module_name))
    if not len(decorated):
        raise DaemonError(f"module {module_name!r} has no steps to serve: decorate its step functions with "
                          f"@governor.step, or give it `registry = StepRegistry()` and register them with "
                          f"@registry.step")
    return decorated


def load_initializer(name: str) -> Callable[..., Any]:
    """The function ``MODULE:FUNCTION`` names: each worker calls it before its first task
    (``Supervisor(initializer=...)``).

    Raises:
        InitializerInvalid: ``name`` is not ``MODULE:FUNCTION``, or the module has no such
            callable. (An import failure raises as the module's own error.)
    """
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise InitializerInvalid(f"the initializer {name!r} is not MODULE:FUNCTION")
    function = getattr(importlib.import_module(module_name), attribute, None)
    if not callable(function):
        raise InitializerInvalid(f"module {module_name!r} has no function {attribute!r} to use as the initializer")
    return function


def _defined_in(fn: Any, module_name: str) -> bool:
    owner = getattr(fn, "__module__", None) or ""
    return owner == module_name or owner.startswith(module_name + ".")


@attrs.frozen
class DaemonConfig:
    """How a daemon runs. Every field has a default that needs nothing installed.

    ``metrics_addr`` takes ``(host, port)`` or any text :func:`parse_metrics_addr` reads.
    """

    socket_path: Path = attrs.field(factory=default_socket_path, converter=Path)
    journal_path: Path = attrs.field(factory=default_journal_path, converter=Path)
    journal_sync: JournalSync = attrs.field(default=JournalSync.NORMAL, converter=JournalSync)
    workers: Optional[int] = None
    critical_workers: int = 1  # Supervisor(critical_workers=): keyed critical steps of different keys at once
    allow_root: bool = False
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    metrics_addr: Optional[Tuple[str, int]] = attrs.field(default=None, converter=_metrics_addr)
    retention_s: float = 7 * 24 * 3600.0
    backend: str = "loky"
    ray_address: Optional[str] = None
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID
    http: Optional[HttpConfig] = None  # the live status page (issue 15); off when None
    sandbox: str = "auto"
    sandbox_writes: Tuple[str, ...] = attrs.field(default=(), converter=tuple)
    # Supervisor(initializer=, initargs=, initializer_timeout_s=): "MODULE:FUNCTION" (see
    # load_initializer) that every local worker runs before its first task (None: none),
    # its arguments, and how long it may take (None: the Supervisor's default).
    initializer: Optional[str] = None
    initargs: Tuple[Any, ...] = attrs.field(default=(), converter=tuple)
    initializer_timeout_s: Optional[float] = None

    def initializer_options(self) -> Dict[str, Any]:
        """The ``Supervisor`` keywords for :attr:`initializer`: none without one; else its
        function, imported now (:func:`load_initializer`), its arguments and its timeout.

        Raises:
            InitializerInvalid: the initializer names no function.
        """
        if self.initializer is None:
            return {}
        options = {"initializer": load_initializer(self.initializer), "initargs": self.initargs}
        if self.initializer_timeout_s is not None:
            options["initializer_timeout_s"] = self.initializer_timeout_s
        return options

