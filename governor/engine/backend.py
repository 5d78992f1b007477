"""The seam between the manager thread and the places steps run: lane backends.

The manager (``governor.engine.manager``) owns the inbox, the wake-up pipe, the selector and the
generic life of a task: queued, dispatched, ended, its workflow settled. A *lane backend*
owns the workers of one or more lanes and everything about them: how a task reaches a
worker, how a limit is enforced, how a worker's death is noticed. Two implementations:

* ``governor.engine.lanes.LocalLanes``: worker processes on this host, forked from a warm
  template (both lanes by default; the critical lane always);
* ``governor.engine.ray_lane.RayLane``: the pool lane as Ray tasks on a cluster.

Both end tasks with the same states and errors through the host, so a step's caller sees
no difference but speed. Every method of a backend runs on the manager thread except
:meth:`LaneBackend.connect` (the caller's thread, before the manager starts) and
:meth:`LaneBackend.gauges` (any thread); a backend's other threads only
:meth:`LaneHost.call_soon`.
"""

from __future__ import annotations

import select
import selectors
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence

from governor.limits import Lane
from governor.engine.metrics import MetricsRecorder
from governor.task import Task, TaskState


def worker_view(pid: Optional[int], lane: Lane, state: str, now: float, task: Optional[Task] = None,
                tasks_run: Optional[int] = None, rss_bytes: Optional[int] = None,
                node: Optional[str] = None, sandbox: str = "none") -> Dict[str, Any]:
    """One entry of ``Supervisor.describe_workers()``, in the same shape for every backend
    (``tasks_run`` and ``rss_bytes`` are ``None`` where a backend cannot know them, ``node``
    where the worker is on this host). ``task_id`` is ``Task.public_id`` (a daemon's journal
    id, else the supervisor's); ``tag`` is the task's ``Call.tag``; ``timeout_s`` and
    ``max_memory_mb`` are the limits enforced on the task (``None``: none), so a live view
    can set running time and RSS against them. ``sandbox`` is what holds the worker:
    ``"none"`` or ``"landlock-v7"`` (a pool worker under Landlock ABI 7, see
    ``governor.workers.sandbox``). ``key`` is the task's critical-lane key (``StepSpec.key``;
    its ``repr`` unless a string or an int), ``None`` without one."""
    return {"pid": pid, "lane": lane.value, "state": state, "task_id": task.public_id if task else None,
            "tag": task.tag if task else None, "key": _shown_key(task.key) if task else None,
            "step": task.step if task else None, "running_s": (now - task.dispatched_at) if task else None,
            "timeout_s": task.limits.effective_timeout_s if task else None,
            "max_memory_mb": task.limits.effective_memory_mb if task else None,
            "tasks_run": tasks_run, "rss_bytes": rss_bytes, "node": node, "sandbox": sandbox}


def _shown_key(key: Any) -> Any:
    return key if key is None or (isinstance(key, (str, int)) and not isinstance(key, bool)) else repr(key)


class ReadSelector:
    """The manager's epoll: each file is registered with the callable to run when it is
    readable, the kind of readiness the manager waits for; a file the manager could not
    write all of at once is also watched for room (:meth:`watch_writable`), so that no
    write ever blocks the manager.

    ``selectors.EpollSelector`` would do, but its ``select()`` builds a key and a mask per
    event, on every turn of the manager, two turns per task; :meth:`ready` hands back the
    callables. ``register`` and ``unregister`` take what ``selectors`` takes (a file
    descriptor or an object with ``fileno()``), so backends use either alike.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: Dict[int, Callable[[], None]] = {}
        self._writers: Dict[int, Callable[[], None]] = {}

    def register(self, fileobj: Any, events: int, handler: Callable[[], None]) -> None:
        """Run ``handler()`` whenever ``fileobj`` is readable (``events`` is ``selectors.EVENT_READ``).

        Raises:
            KeyError: the file is registered already.
        """
        if events != selectors.EVENT_READ:
            raise ValueError("only readability is registered (selectors.EVENT_READ); see watch_writable")
        fd = _fd_of(fileobj)
        if fd in self._handlers:
            raise KeyError(f"{fileobj!r} (fd {fd}) is already registered")
        self._epoll.register(fd, select.EPOLLIN)
        self._handlers[fd] = handler

    def unregister(self, fileobj: Any) -> None:
        """Stop watching ``fileobj`` (for room too); a handler already returned by
        :meth:`ready` still runs.

        Raises:
            KeyError: the file is not registered.
        """
        fd = _fd_of(fileobj)
        del self._handlers[fd]
        self._writers.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # closed already: the kernel dropped it from the epoll set

    def watch_writable(self, fileobj: Any, handler: Callable[[], None]) -> None:
        """Also run ``handler()`` whenever the registered ``fileobj`` has room to write
        (or has failed), until :meth:`unwatch_writable`.

        Raises:
            KeyError: the file is not registered for reading, or is watched already.
        """
        fd = _fd_of(fileobj)
        if fd not in self._handlers or fd in self._writers:
            raise KeyError(f"{fileobj!r} (fd {fd}) is not registered, or its room is watched already")
        self._epoll.modify(fd, select.EPOLLIN | select.EPOLLOUT)
        self._writers[fd] = handler

    def unwatch_writable(self, fileobj: Any) -> None:
        """Stop watching ``fileobj`` for room (nothing if it was not watched)."""
        fd = _fd_of(fileobj)
        if self._writers.pop(fd, None) is not None:
            self._epoll.modify(fd, select.EPOLLIN)

    def ready(self, timeout: float) -> List[Callable[[], None]]:
        """The handlers of the files readable (and the room handlers of the files writable)
        within ``timeout`` seconds (at least that long, rounded up to a millisecond, when
        none is)."""
        handlers, writers = self._handlers, self._writers
        events = self._epoll.poll(timeout, len(handlers) or 1)
        if not writers:
            return [handlers[fd] for fd, _ in events if fd in handlers]
        ready = []
        for fd, mask in events:
            if mask & _READ_EVENTS and fd in handlers:
                ready.append(handlers[fd])
            if mask & _WRITE_EVENTS and fd in writers:
                ready.append(writers[fd])
        return ready

    def close(self) -> None:
        self._epoll.close()
        self._handlers.clear()
        self._writers.clear()


#: What makes a file's read handler run: data, its end, or an error (read says which).
_READ_EVENTS = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR

#: What makes its room handler run: room, or an error (the write says which).
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


def _fd_of(fileobj: Any) -> int:
    return fileobj if isinstance(fileobj, int) else fileobj.fileno()


class LaneHost(Protocol):
    """What the manager offers its backends."""

    clock: Callable[[], float]
    metrics: MetricsRecorder
    selector: ReadSelector  # register a file with a callable, run when the file is readable

    @property
    def closing(self) -> bool:
        """The supervisor is shutting down: start no new workers."""

    def call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the manager thread (any thread may call this)."""

    def dispatching(self, task: Task) -> bool:
        """A task left its lane's queue for a worker (it is ``RUNNING``): count it out and
        run the dispatch hook; ``False`` means the task failed and must not run."""

    def conclude_outcome(self, task: Task, outcome: Any) -> bool:
        """End a task from a worker's ``Outcome``; see :meth:`conclude`."""

    def conclude(self, task: Task, state: TaskState, error: Optional[BaseException] = None,
                 result: Any = None, *, by_kill: bool = False) -> bool:
        """End a task, queued or running: the one place a task ends (state, queue count,
        metrics, future, workflow). ``False`` if it had ended, or is claimed for a kill and
        this is not the kill (``by_kill``). The backend lets go of the task's run first:
        the host never calls back down into it for the end."""

    def fail_start(self, error: BaseException) -> None:
        """No worker could be started before the supervisor was warm: abort the start."""


class LaneBackend(Protocol):
    """Runs the tasks of its lanes; see the module docstring for the threading rules."""

    lanes: Sequence[Lane]

    def queue(self, lane: Lane) -> Any:
        """The queue of one of its lanes (the manager appends; the backend pops): a deque, or the
        pool lane's ``RankedQueue`` (``append``, ``popleft``, ``len``, iteration)."""

    def connect(self) -> None:
        """Reach the workers' infrastructure before the manager starts (caller's thread)."""

    def begin(self) -> None:
        """Start workers: the manager thread's first act."""

    @property
    def warm(self) -> bool:
        """Every worker it promised at start is ready."""

    @property
    def quiet(self) -> bool:
        """Nothing runs or starts, and nothing queued may still run."""

    def dispatch(self) -> None:
        """Hand queued tasks to free workers."""

    def maintain(self) -> None:
        """After each turn of the loop: replace lost workers and the like."""

    def next_deadline(self) -> Optional[float]:
        """When :meth:`on_time` must next run (a timer or a sample), or ``None``."""

    def on_time(self) -> None:
        """Fire what is due: timeouts, cancel graces, memory samples."""

    def cancel(self, task: Task) -> None:
        """A cancel was recorded on a task of its lanes that is no longer queued."""

    def running_tasks(self) -> List[Task]:
        """The tasks its workers run now."""

    def describe(self, now: float) -> List[Dict[str, Any]]:
        """One dict per worker (or task in flight) for ``Supervisor.describe_workers``."""

    def gauges(self) -> Dict[str, Dict[str, Any]]:
        """Lane name -> busy / idle / starting / spares_ready / worker_pids (any thread)."""

    def abort(self) -> None:
        """The manager failed: stop every step now."""

    def close(self) -> None:
        """Release every worker and resource (manager thread, at the very end)."""
