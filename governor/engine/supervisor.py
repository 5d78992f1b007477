"""The public face of Governor: :class:`Supervisor` and its cancellation groups, :class:`Scope`.

A ``Supervisor`` takes a snapshot of a step registry, classifies every step into the
critical or the pool lane once, starts both lanes' workers (warm: forked from a template
that imported every step module) and then only records intent: ``submit`` validates, numbers the task and puts it
on the manager's inbox; the manager thread (``governor.engine.manager``) does the rest.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.thread  # noqa: F401  (see _register_atexit below)
import itertools
import os
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

from governor import aio
from governor.workers import sandbox as sandboxing
from governor.callbacks import CallbackRunner
from governor.errors import (SupervisorBroken, SupervisorClosed, SupervisorForked,
                             UnknownStep, WorkerStartFailed)
from governor.limits import Lane, Limits
from governor.engine.lanes import LocalConfig
from governor.engine.starts import WORKER_START_TIMEOUT_S
from governor.engine.mapping import MapRun, Progress
from governor.engine.scope import Scope, gather
from governor.engine.manager import Manager, ManagerConfig
from governor.engine.metrics import TOP_KEYS, MetricsRecorder, prometheus_registry, prometheus_text
from governor.engine.routes import Route, workflow_key
from governor.steps.registry import REGISTRY, StepLookup
from governor.task import (CancelRequest, Call, Task, TaskFuture, WorkflowFuture, WorkflowRun, check_step_designator,
                           in_done_callback)

#: Tasks a lane may hold waiting before ``submit`` raises ``QueueFull``.
DEFAULT_QUEUE_SIZE = 10_000

#: Supersede keys remembered before finished ones are forgotten (see ``Supervisor.scope``).
MAX_KEYED_SCOPES = 1024

#: The values of ``Supervisor(backend=...)``.
BACKENDS = ("loky", "ray")

#: The values of ``Supervisor(sandbox=...)``.
SANDBOX_MODES = ("auto", "require", "off")

#: How often a map waiting for room in a full lane looks again whether the supervisor
#: broke: a broken manager empties no queue and wakes no one.
ROOM_RECHECK_S = 1.0

#: How long ``start()`` waits for every worker to be spawned and warm.
DEFAULT_START_TIMEOUT_S = 120.0


def default_workers() -> int:
    """Pool workers when none are given: ``2 x CPUs``, at least 4, at most 16.

    Steps in the pool lane are mostly I/O-bound (git, SQLite, sockets), so more workers
    than cores pays; a worker, forked from the warm template, costs a few MiB of private
    memory.
    """
    return max(4, min(16, 2 * (os.cpu_count() or 1)))


class Supervisor(concurrent.futures.Executor):
    """Runs registered steps in worker processes: a serial critical lane and a parallel pool.

    A ``concurrent.futures.Executor``: code written for ``ProcessPoolExecutor`` runs on it
    once its functions are registered as steps (``submit``, ``map``, ``shutdown``, ``with``,
    and its futures with ``wait`` and ``as_completed``).

    Args:
        registry: a ``governor.steps.StepRegistry`` (default: the one ``@governor.step``
            registers on); its steps are snapshotted at construction, so steps registered
            later are unknown to this supervisor.
        workers: processes in the pool lane (default: :func:`default_workers`).
        limits: default limits for every step; a step's own limits, then a submission's,
            override them field by field.
        queue_size: tasks each lane may hold waiting before ``submit`` raises ``QueueFull``
            (``map`` waits for room instead).
        spares: warm idle workers kept per lane beyond ``workers``, so a killed or crashed
            worker is replaced without a cold spawn.
        max_tasks_per_worker: replace a worker after this many tasks (``None``: never);
            ``max_tasks_per_child`` is its ``ProcessPoolExecutor`` name.
        initializer: called as ``initializer(*initargs)`` once in every worker of both
            local lanes, after its fork and before its first task, under the pool lane's
            sandbox. If it raises, or the worker has not run it and connected within
            ``initializer_timeout_s``, the worker takes no task: :meth:`start` raises
            ``WorkerStartFailed`` with the traceback; a replacement is retried with
            back-off, and the lane's queued tasks fail after three failures in a row.
        recycle_rss_mb: replace a worker whose RSS after a task exceeds this (a leak).
        on_dispatch: called on the manager thread with each task right before it is handed
            to its worker (a journal records "started" here, durably, so a critical step
            is never run twice). If it raises, the task fails and is not run. Keep it fast:
            the manager waits for it.
        backend: where the pool lane runs: ``"loky"`` (local worker processes, the
            default) or ``"ray"`` (tasks on a Ray cluster, at most ``workers`` at a time;
            needs the ``ray`` extra). The critical lane always runs locally. Limits, kills,
            errors and metrics are the same on both (see ``governor.engine.ray_lane``).
        ray_address: with ``backend="ray"``: the cluster to join (``"auto"``,
            ``"host:port"``, ``"ray://..."``); ``None`` uses the Ray this process already
            initialised, or starts a private local node bound to 127.0.0.1.
        ray_options: with ``backend="ray"``: ``.options()`` for every task, e.g.
            ``{"num_cpus": 0.25}`` to pack I/O-bound steps, or a ``runtime_env``.
        ray_callback_host: with ``backend="ray"``: the address of this host that Ray
            workers connect back to (default: 127.0.0.1 for a private node, else this
            host's address as Ray sees it).
        sandbox: the pool lane's read-only sandbox (Landlock, see README "The sandbox"):
            ``"auto"`` applies what the kernel offers, ``"require"`` makes :meth:`start`
            fail where the kernel has no Landlock, ``"off"`` applies none. The critical
            lane and the Ray lane are never sandboxed (``"require"`` with Ray is an error).
        sandbox_writes: paths every pool worker may also write beneath, besides those the
            pool steps declare with ``writes=``.
        wrap_step_errors: a step's exception reaches its future as ``StepFailed`` (with the
            exception as ``original``) even when it pickles. By default the future raises
            the exception itself, its worker's traceback chained as ``__cause__``, as
            ``ProcessPoolExecutor`` does; ``StepFailed`` then means it did not pickle. The
            daemon wraps: its clients cannot rebuild an arbitrary exception type.
        critical_workers: processes in the critical lane. With one (the default), critical
            steps run one at a time in submission order. With more, critical steps with
            the same lane key (``@registry.step(critical=True, key="chat_id")``) still do,
            while steps of different keys run in parallel, at most this many at once; a
            critical step without a key runs alone, after every critical step submitted
            before it and before every one submitted after it.
        clock: the monotonic clock deadlines are read from (tests inject one).

    Use it as a context manager (``with Supervisor(registry) as sup:``), or call
    :meth:`start` and :meth:`shutdown`; as with ``ProcessPoolExecutor``, the first
    submission starts a supervisor nobody started. Leaving the ``with`` block waits for the
    work it accepted; leaving it on an exception cancels that work (queued and running).
    """

    def __init__(self, registry: Any = None, workers: Optional[int] = None, *, limits: Optional[Limits] = None,
                 queue_size: int = DEFAULT_QUEUE_SIZE, spares: int = 1,
                 max_tasks_per_worker: Optional[int] = None, max_tasks_per_child: Optional[int] = None,
                 initializer: Optional[Callable[..., Any]] = None, initargs: Iterable[Any] = (),
                 initializer_timeout_s: float = WORKER_START_TIMEOUT_S, recycle_rss_mb: Optional[float] = None,
                 on_dispatch: Optional[Callable[[Task], None]] = None,
                 backend: str = "loky", ray_address: Optional[str] = None,
                 ray_options: Optional[Mapping[str, Any]] = None, ray_callback_host: Optional[str] = None,
                 sandbox: str = "auto", sandbox_writes: Iterable[Any] = (), wrap_step_errors: bool = False,
                 critical_workers: int = 1, clock: Callable[[], float] = time.monotonic):
        workers = default_workers() if workers is None else workers
        _require_int("workers", workers, minimum=1)
        _require_int("critical_workers", critical_workers, minimum=1)
        _require_int("queue_size", queue_size, minimum=1)
        _require_int("spares", spares, minimum=0)
        if max_tasks_per_child is not None:
            if max_tasks_per_worker is not None:
                raise TypeError("give max_tasks_per_worker or its alias max_tasks_per_child, not both")
            max_tasks_per_worker = max_tasks_per_child
        if max_tasks_per_worker is not None:
            _require_int("max_tasks_per_worker", max_tasks_per_worker, minimum=1)
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, not {type(initializer).__name__}")
        if initializer is not None and backend == "ray":
            raise ValueError("initializer needs backend='loky': Ray reuses its workers for other work")
        if not initializer_timeout_s > 0:
            raise ValueError(f"initializer_timeout_s must be > 0, got {initializer_timeout_s!r}")
        if limits is not None and not isinstance(limits, Limits):
            raise TypeError(f"limits must be a Limits, not {type(limits).__name__}")
        if recycle_rss_mb is not None and not recycle_rss_mb > 0:
            raise ValueError(f"recycle_rss_mb must be > 0, got {recycle_rss_mb!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        if backend != "ray" and (ray_address, ray_options, ray_callback_host) != (None, None, None):
            raise ValueError("ray_address, ray_options and ray_callback_host need backend='ray'")
        if sandbox not in SANDBOX_MODES:
            raise ValueError(f"sandbox must be one of {', '.join(map(repr, SANDBOX_MODES))}, got {sandbox!r}")
        if sandbox == "require" and backend == "ray":
            raise ValueError("sandbox='require' needs backend='loky': Ray reuses its worker processes for "
                             "other work, so the Ray lane runs no sandbox")
        ray_config = None
        if backend == "ray":
            from governor.engine.ray_lane import RayConfig, import_ray
            import_ray()  # fail here, naming the extra, rather than at start()
            ray_config = RayConfig(ray_address, ray_options or {}, ray_callback_host)
        defaults = limits or Limits()
        registry = REGISTRY if registry is None else registry
        specs = registry.snapshot()
        self._lookup = StepLookup(specs)
        self._routes: Dict[str, Route] = {}
        for name, spec in specs.items():
            classification = registry.classify(name)
            self._routes[name] = Route(spec, classification.lane, classification.reason,
                                        spec.limits.over(defaults))
        self.workers = workers
        self.queue_size = queue_size
        self._clock = clock
        local_workers = {Lane.CRITICAL: critical_workers}
        if not ray_config:
            local_workers[Lane.POOL] = workers
        self.backend = backend
        self.sandbox = sandbox
        self.sandbox_policy = sandboxing.policy_for(
            (route.spec for route in self._routes.values() if route.lane is Lane.POOL), sandbox_writes)
        self._config = ManagerConfig(
            local=LocalConfig(
                steps=specs, step_modules=sorted({spec.fn.__module__ for spec in specs.values()} - {"__main__"}),
                workers=local_workers, spares=spares, max_tasks_per_worker=max_tasks_per_worker,
                recycle_rss_mb=recycle_rss_mb, sandbox=None if sandbox == "off" else self.sandbox_policy,
                initializer=None if initializer is None else (initializer, tuple(initargs), initializer_timeout_s),
                start_timeout_s=WORKER_START_TIMEOUT_S if initializer is None else initializer_timeout_s),
            pool_workers=workers, queue_size=queue_size, on_dispatch=on_dispatch, ray=ray_config,
            wrap_step_errors=wrap_step_errors)
        self._metrics = MetricsRecorder(self._lane_gauges)
        self._prometheus = prometheus_registry(self._metrics, self._queue_depth, self._key_depth)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._manager: Optional[Manager] = None
        self._callbacks = CallbackRunner()
        self._accepting = False
        self._shut_down = False
        self._start_lock = threading.Lock()  # held through start(): see _start_on_first_use
        self._keyed_scopes: Dict[str, Scope] = {}
        self._owner_pid: Optional[int] = None  # the process that started it (see _enqueue)

    # ----------------------------------------------------------------- life

    def start(self, timeout: float = DEFAULT_START_TIMEOUT_S) -> "Supervisor":
        """Start both lanes and return once every worker is spawned and warm.

        Raises:
            WorkerStartFailed: a worker could not be started (the cause is chained), or
                the Ray cluster could not run a governor task.
            SandboxUnavailable: ``sandbox="require"`` on a kernel without Landlock.
        """
        with self._start_lock:
            return self._start(timeout)

    def _start(self, timeout: float) -> "Supervisor":
        if self.sandbox == "require":
            sandboxing.require()
        with self._lock:
            if self._shut_down:
                raise SupervisorClosed("this supervisor was shut down")
            if self._manager is not None:
                raise SupervisorClosed("this supervisor was already started")
            self._manager = Manager(self._config, self._metrics, self._cancel, self._clock,
                                   self._callbacks)
        self._manager.connect()
        self._manager.start()
        self._owner_pid = os.getpid()
        _live_supervisors.add(self)
        if not self._manager.warm.wait(timeout):
            self.shutdown(wait=True)
            raise WorkerStartFailed(f"workers were not warm after {timeout}s")
        if self._manager.start_error is not None:
            self._manager.join()
            raise self._manager.start_error
        with self._lock:
            self._accepting = True
        return self

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, cancel_running: bool = False,
                 cancel_pending: Optional[bool] = None) -> None:
        """Stop taking work; finish (or cancel) what was accepted; stop every worker.

        Args:
            wait: block until every worker process has exited (and so every accepted
                task has ended).
            cancel_futures: cancel queued tasks instead of running them, as
                ``Executor.shutdown`` does.
            cancel_running: also cancel running tasks (cooperatively, then by killing
                their workers after their ``cancel_grace_s``); Governor's own extension.
            cancel_pending: deprecated name of ``cancel_futures``.

        Safe to call more than once and from a done-callback (it then does not wait: the
        manager may be waiting for the very task whose callback runs).
        """
        if cancel_pending is not None:
            warnings.warn("shutdown(cancel_pending=) is deprecated: use cancel_futures=",
                          DeprecationWarning, stacklevel=2)
            cancel_futures = cancel_futures or cancel_pending
        with self._lock:
            self._accepting = False
            self._shut_down = True
            manager = self._manager
        if manager is not None:
            manager.wake_room_waiters()  # a map waiting for room gives up
        if manager is None or not manager.is_alive():
            return
        manager.request_shutdown(cancel_futures, cancel_running)
        if wait and threading.current_thread() is not manager and not in_done_callback():
            manager.join()
            self._callbacks.close()  # the callbacks due have run (not waited for from one of them)

    def __enter__(self) -> "Supervisor":
        return self.start()

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        # Leaving normally waits for the work accepted (as concurrent.futures does); leaving
        # on an exception cancels it, so a failure never hangs on a step that will not end.
        failed = exc_type is not None
        self.shutdown(wait=True, cancel_futures=failed, cancel_running=failed)

    # ----------------------------------------------------------------- submitting

    def submit(self, step: Any, /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Run ``step(*args, **kwargs)`` in its lane; return its future.

        Args:
            step: the step's registered name, or the function or class registered as it.

        Raises:
            UnknownStep: no step has that name (close matches are suggested), or the
                function or class is not registered (the message says how to).
            TypeError: ``step`` is neither a name nor a function or class.
            InvalidParameters: the arguments do not fit the step's signature.
            QueueFull: the step's lane has ``queue_size`` tasks waiting.
            SupervisorClosed: shut down.
            SupervisorBroken: its manager thread failed (a bug); nothing was queued.
        """
        task = self._new_task(step, args, kwargs)
        self._enqueue([task])
        return task.future

    async def asubmit(self, step: Any, /, *args: Any, **kwargs: Any) -> Any:
        """:meth:`submit` from asyncio: await the step's result without blocking the loop.

        Cancelling the awaiting asyncio task cancels the step (see :mod:`governor.aio`).
        Start the supervisor before the loop runs (``with``): a first submission that
        starts it would block the loop until its workers are warm.

        Raises:
            what :meth:`submit` raises, then the step's error.
        """
        return await aio.result(self.submit(step, *args, **kwargs))

    def submit_call(self, call: Call) -> TaskFuture:
        """Like :meth:`submit`, for a :class:`~governor.task.Call` (which may carry its own limits)."""
        task = self._task_of(call)
        self._enqueue([task])
        return task.future

    def run_batch(self, calls: Iterable[Any], *, return_exceptions: bool = False,
                  timeout: Optional[float] = None) -> List[Any]:
        """Submit many steps at once, each in its own lane, and wait for all of them.

        Args:
            calls: ``Call`` objects, names, ``(name, kwargs)`` or ``(name, args, kwargs)``.
            return_exceptions: put each failed step's error in its place in the list
                instead of raising.
            timeout: seconds to wait for the whole batch; on expiry the unfinished steps
                are cancelled and ``TimeoutError`` is raised.

        Returns:
            the results in the order of ``calls``.

        Raises:
            the first failed step's error (in the order of ``calls``), once every step of
            the batch has ended, unless ``return_exceptions``. Nothing is submitted if any
            call names an unknown step or has bad parameters.
        """
        tasks = [self._task_of(Call.of(item)) for item in calls]
        self._enqueue(tasks)
        return gather([task.future for task in tasks], return_exceptions, timeout)

    def map(self, step: Any, /, *iterables: Iterable[Any], timeout: Optional[float] = None,
            chunksize: Union[int, str] = 1, buffersize: Optional[int] = None,
            progress: Progress = None) -> Iterator[Any]:
        """Run ``step`` on the items of ``iterables``, as ``concurrent.futures.Executor.map``.

        Lazy and bounded: the iterables are read as the results are taken, and at most
        ``buffersize`` tasks (default: the lane's ``queue_size``) are submitted and not yet
        yielded. The first of them are submitted before this returns. A lane whose queue
        is full makes the map wait, never raise ``QueueFull``.

        Args:
            step: a registered step (its name, or its function or class); its lane and
                limits apply.
            iterables: one per positional parameter, zipped as ``map`` does.
            timeout: seconds from this call for every result to be ready; past it,
                iterating raises ``TimeoutError``.
            chunksize: calls per task. A chunk runs as one task, one call after another
                in one worker: its limits (timeout, memory) apply to the whole chunk, and
                a chunk whose step raises, or whose worker is killed, fails its own calls
                and no other chunk's. Larger chunks cost far less per call for tiny steps.
                ``"auto"``: sized from the first call's time, so that a chunk runs about
                ``governor.engine.mapping.AUTO_CHUNK_TARGET_S``.
            buffersize: the most tasks submitted and not yet yielded (Python 3.14's
                ``Executor.map(buffersize=)``).
            progress: a callable ``progress(done, total)`` called on the iterating thread
                after each result, with the calls done so far and their total (``None``
                when an iterable has no length); or ``True`` for a tqdm bar.

        Returns:
            an iterator of the results in order. Iterating raises a failed call's error
            at its place; the unfinished tasks are then cancelled, as they are when the
            iterator is closed early.

        Raises:
            UnknownStep, InvalidParameters, SupervisorClosed, SupervisorBroken: as
                :meth:`submit`, before anything is submitted.
        """
        return self._map_run(step, iterables, timeout, chunksize, buffersize, progress).results_in_order()

    def imap_unordered(self, step: Any, /, *iterables: Iterable[Any], timeout: Optional[float] = None,
                       chunksize: Union[int, str] = 1, buffersize: Optional[int] = None,
                       progress: Progress = None) -> Iterator[Any]:
        """:meth:`map`, yielding each result as soon as its task ends (as
        ``multiprocessing.Pool.imap_unordered``): a slow call holds up no later result."""
        return self._map_run(step, iterables, timeout, chunksize, buffersize, progress).results_as_completed()

    def _map_run(self, step: Any, iterables: tuple, timeout: Optional[float], chunksize: Union[int, str],
                 buffersize: Optional[int], progress: Progress) -> MapRun:
        if chunksize != "auto":
            _require_int("chunksize", chunksize, minimum=1)
        if buffersize is not None:
            _require_int("buffersize", buffersize, minimum=1)
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        route = self._route(step)
        route.check_arguments((None,) * len(iterables), {})  # every call has this shape
        run = MapRun(self, route, iterables, chunksize, buffersize, timeout, progress)
        try:
            run.top_up()
        except BaseException:
            run.close()
            raise
        return run

    def workflow(self, calls: Iterable[Any], *, key: Any = None) -> WorkflowFuture:
        """Run steps one after another in the critical lane, whatever their class.

        The workflow is queued as one block: no other critical step of its key runs
        between its steps. Its key is ``key`` if given, else the one lane key its steps
        declare (``None``, so that it runs alone like any keyless critical step, when they
        declare none or several). It stops at the first step that does not succeed; the
        later ones are skipped (their futures raise ``StepSkipped``).

        Returns:
            a future of the list of results, which raises ``WorkflowFailed`` (with the
            failed step's error, the results so far and the skipped names) on failure.
        """
        tasks = [self._task_of(Call.of(item), lane=Lane.CRITICAL) for item in calls]
        if not tasks:
            raise ValueError("a workflow needs at least one step")
        future = WorkflowFuture([task.future for task in tasks], self._callbacks)
        flow = WorkflowRun(tasks, future)
        if key is None:
            key = workflow_key(task.key for task in tasks)
        for task in tasks:
            task.workflow, task.key = flow, key
        self._enqueue(tasks)
        return future

    def scope(self, key: Optional[str] = None, order: Optional[int] = None) -> "Scope":
        """A cancellation group: ``scope.cancel()`` stops every step submitted through it.

        Args:
            key: supersede what came before under this key: a new scope with the key
                of an earlier one cancels that one's unfinished steps (reason
                ``"superseded"``). The pattern of a view switch: ``sup.scope(key="view")``
                per switch, and the last view's steps are the only ones left running.
            order: which of two submissions with the same key is the newer, when they may
                arrive out of order (a browser's clicks through several server processes):
                a scope whose ``order`` is below that of the key's current scope comes
                late, and is itself superseded at once. Without it, arrival order decides.
        """
        scope = Scope(self)
        if key is None:
            return scope
        scope.order = order
        with self._lock:
            previous = self._keyed_scopes.get(key)
            late = order is not None and previous is not None and previous.order is not None and order < previous.order
            if not late:
                self._keyed_scopes.pop(key, None)
                if len(self._keyed_scopes) >= MAX_KEYED_SCOPES:  # forget keys whose work is over
                    self._keyed_scopes = {k: kept for k, kept in self._keyed_scopes.items() if not kept.finished}
                self._keyed_scopes[key] = scope
        if late:
            scope.cancel_for(CancelRequest("superseded", f"a newer submission with key {key!r} came first"))
        elif previous is not None:
            previous.cancel_for(CancelRequest("superseded", f"a newer submission with key {key!r}"))
        return scope

    # ----------------------------------------------------------------- reading

    def describe_workers(self, timeout: float = 10.0) -> List[Dict[str, Any]]:
        """One dict per live worker: pid, lane, state, task_id, step, running_s, tasks_run, rss_bytes, node,
        sandbox (``"landlock-v7"`` for a sandboxed pool worker, else ``"none"``).

        Asked of the manager thread, which owns the slots (so it costs a round trip).
        """
        if self._manager is None or not self._manager.is_alive():
            return []
        reply: concurrent.futures.Future = concurrent.futures.Future()
        self._manager.request_describe(reply)
        return reply.result(timeout)

    def classify(self, step: Any) -> tuple:
        """``(lane, reason)``: where ``step`` runs under this supervisor, and why."""
        route = self._route(step)
        return route.lane, route.reason

    def metrics(self) -> Dict[str, Any]:
        """A JSON-serialisable snapshot of every figure (see README, "Metrics").

        Keys: ``tasks`` (lane -> step -> outcome -> count), ``timings`` (lane -> step ->
        queue_wait_seconds / duration_seconds / latency_seconds / peak_rss_bytes -> count,
        sum, p50, p95, p99), ``queue_depth``, ``in_flight``, ``workers`` (busy / idle /
        starting), ``warm_spares`` (per lane), ``memory`` (supervisor_rss_bytes,
        workers_rss_bytes), ``worker_spawns``, ``worker_kills`` (lane -> reason),
        ``worker_recycles`` (lane -> reason), ``retries`` (lane -> step -> attempts run again),
        ``critical_queue_by_key`` (lane key -> tasks queued, for the ``TOP_KEYS`` keys with the most).
        """
        return self._metrics.snapshot(self._queue_depth(), self._key_depth())

    def prometheus_text(self) -> str:
        """The same figures in the Prometheus text format, from this supervisor's own registry."""
        return prometheus_text(self._prometheus)

    def _queue_depth(self) -> Dict[str, int]:
        manager = self._manager
        return manager.queue_depth() if manager is not None else {lane.value: 0 for lane in Lane}

    def _key_depth(self) -> Dict[str, int]:
        manager = self._manager
        return manager.key_depths(TOP_KEYS) if manager is not None else {}

    def _lane_gauges(self) -> Dict[str, Dict[str, Any]]:
        manager = self._manager
        return manager.gauges() if manager is not None else {}

    # ----------------------------------------------------------------- internals

    def check_call(self, call: Call) -> Route:
        """Raise what :meth:`submit_call` would for ``call``'s step and arguments, submitting nothing.

        Raises:
            UnknownStep: no step has that name.
            InvalidParameters: the arguments do not fit the step's signature.
        """
        route = self._route(call.step)
        route.check_arguments(call.args, call.kwargs)
        return route

    def describe_steps(self) -> List[Dict[str, Any]]:
        """One dict per step: name, lane, reason, limits (the effective ones), description, signature.

        ``signature`` is the text people read; ``parameters`` the same signature for a program
        to check and convert arguments by before it submits (``StepParameters.to_wire``):
        ``{"name", "kind"`` (an ``inspect.Parameter`` kind's name) ``, "required", "type"``
        (what the annotation takes, or null) ``, "nullable"}`` each, in order.
        """
        return [{"name": name, "lane": route.lane.value, "reason": route.reason,
                 "limits": {"timeout_s": route.limits.effective_timeout_s,
                            "max_memory_mb": route.limits.effective_memory_mb,
                            "cancel_grace_s": route.limits.effective_cancel_grace_s},
                 "description": route.spec.description, "signature": str(route.signature),
                 "parameters": route.parameters.to_wire()}
                for name, route in self._routes.items()]

    @property
    def prometheus_registry(self):
        """This supervisor's own prometheus_client ``CollectorRegistry`` (to serve over HTTP)."""
        return self._prometheus

    def _route(self, step: Any) -> Route:
        name = self._lookup.name_of(step)
        route = self._routes.get(name)
        if route is None:
            raise UnknownStep.for_name(name, self._routes)
        return route

    def _task_of(self, call: Call, lane: Optional[Lane] = None) -> Task:
        return self._new_task(call.step, call.args, call.kwargs, call.limits, call.tag, call.ref, lane, call.cwd,
                              call.priority)

    def _new_task(self, step: Any, args: tuple, kwargs: dict, limits: Optional[Limits] = None, tag: Any = None,
                  ref: Optional[int] = None, lane: Optional[Lane] = None, cwd: Optional[str] = None,
                  priority: int = 0) -> Task:
        """A task for one call, checked (see :meth:`submit`), with its future; not queued yet."""
        if not isinstance(step, str):
            check_step_designator(step)
        route = self._route(step)
        route.check_arguments(args, kwargs)
        limits = route.limits if limits is None else limits.over(route.limits)
        task = Task(0, route.spec.name, lane or route.lane, args, kwargs, limits, self._clock(), tag=tag, ref=ref,
                    cwd=cwd, key=route.key_of(args, kwargs), priority=priority)
        task.future = self._future_of(task)
        return task

    def _future_of(self, task: Task) -> TaskFuture:
        return TaskFuture(task, self._cancel, self._callbacks)

    def _start_on_first_use(self) -> None:
        # ProcessPoolExecutor starts on its first submit, and code written for it never calls
        # start(). The start lock makes concurrent first submissions start it once.
        if not self._accepting and not self._shut_down:
            with self._start_lock:
                if self._manager is None and not self._shut_down:
                    self._start(DEFAULT_START_TIMEOUT_S)

    def _enqueue(self, tasks: Sequence[Task]) -> None:
        self._start_on_first_use()
        # Numbering and appending to the inbox under one lock fixes the submission order
        # across threads, which is the critical lane's execution order.
        with self._lock:
            self._check_accepting()
            self._manager.admit(tasks)  # raises QueueFull, counting none of them
            for task in tasks:
                task.id = next(self._ids)
            self._manager.enqueue(tasks)
        self._manager.wake()  # outside the lock: the manager would wake straight into it

    def _check_accepting(self) -> None:
        """Raise unless this supervisor takes work from this process (hold ``_lock``)."""
        if self._owner_pid is not None and self._owner_pid != os.getpid():
            raise SupervisorForked(f"this supervisor was started by process {self._owner_pid}; process "
                                   f"{os.getpid()} was forked from it and cannot use it: start a new one here")
        if self._manager is not None and self._manager.broken is not None:
            raise SupervisorBroken(f"the supervisor is broken (its manager thread failed: "
                                   f"{self._manager.broken!r}); start a new one") from self._manager.broken
        if not self._accepting:
            raise SupervisorClosed("the supervisor was shut down: it takes no more work")

    def _queue_room(self, lane: Lane) -> int:
        """How many more tasks ``lane``'s queue takes now."""
        manager = self._manager
        return manager.queue_room(lane) if manager is not None else self.queue_size

    def _wait_for_room(self, lane: Lane, deadline: Optional[float]) -> int:
        """Wait until ``lane``'s queue takes a task; how many it takes (``Supervisor.map``).

        Raises:
            TimeoutError: ``deadline`` (on ``time.monotonic()``) passed first.
            SupervisorClosed, SupervisorBroken: as :meth:`submit`: it will never have room.
        """
        while True:
            with self._lock:
                self._check_accepting()
            # Woken by each task leaving the queue, and by shutdown. The slice bounds the
            # wait for a manager that broke (it empties no queue, wakes no one).
            wait = ROOM_RECHECK_S if deadline is None else min(ROOM_RECHECK_S, deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError(f"the {lane.value} lane's queue had no room before the map's timeout")
            room = self._manager.wait_for_room(lane, wait)
            if room:
                return room

    def _cancel(self, task: Task, request: CancelRequest) -> bool:
        """Cancel ``task`` (any thread): a queued one ends here, a running one is stopped by the manager."""
        accepted, cancelled_now = task.request_cancel(request)
        if cancelled_now:
            self._manager.conclude_queued_cancel(task)
        elif accepted and self._manager is not None:
            self._manager.request_cancel(task)
        return accepted


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


_live_supervisors: "weakref.WeakSet[Supervisor]" = weakref.WeakSet()


def _shutdown_live_supervisors() -> None:
    # An interpreter that exits with a supervisor still running must not leave workers.
    for supervisor in list(_live_supervisors):
        supervisor.shutdown(wait=True, cancel_futures=True, cancel_running=True)


# Where CPython's ProcessPoolExecutor hooks its exit (concurrent/futures/process.py): these
# hooks run in ``threading._shutdown``, before the interpreter joins its non-daemon threads
# and before ``atexit``. A plain ``atexit`` hook came too late: multiprocessing's own exit
# hook (registered later, so run earlier) joined the template process, which never exits
# on its own, and the interpreter hung. The hooks run last-registered first, so importing
# ``concurrent.futures.thread`` first makes ours run before the thread pools refuse new work
# (the worker cleanup thread still takes the last temp dirs).
threading._register_atexit(_shutdown_live_supervisors)
# A forked child owns none of its parent's supervisors: its exit must not touch them.
os.register_at_fork(after_in_child=_live_supervisors.clear)
