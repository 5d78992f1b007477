"""Process pools measured side by side: Governor's Supervisor and its peers, behind one adapter.

Every peer is a :class:`Peer`: ``start()``, ``submit(step, *args) -> Future``, ``shutdown()``,
usable as a context manager. Steps are named as in :mod:`bench.bench_steps`'s registry; the
Supervisor runs them by name, the others get the function itself. So a scenario measures
every peer with one loop and never has per-peer code.

* ``governor``: :class:`governor.Supervisor` (pool lane, workers forked from its template).
* ``governor-ray``: the same Supervisor with its pool lane on Ray (``backend="ray"``), on
  the Ray this process initialised. Not in :data:`PEERS`: only the ``ray`` scenario, which
  starts that Ray, measures it.
* ``loky``: a ``loky.ProcessPoolExecutor`` of our own (not the process-wide reusable one, so
  shutting it down cannot disturb anything else).
* ``stdlib``: ``concurrent.futures.ProcessPoolExecutor``.
* ``pebble``: ``pebble.ProcessPool``; optional (the ``bench`` extra), skipped when missing.
* ``mpire``: ``mpire.WorkerPool``; optional (the ``bench`` extra), skipped when missing.
* ``mp.Pool``: ``multiprocessing.Pool``.

The last four fork their workers from a forkserver (:func:`worker_context`), never from
this process, which runs threads.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import multiprocessing
import os
from typing import Any, Callable, Dict, List, Optional, Type

import loky
from governor import Supervisor

from governor.bench import bench_steps

#: Tasks a warm-up runs at once per worker: two 20 ms sleeps each keep every worker busy at
#: the same time, so each one imports the step module and pays its first-call costs.
WARMUP_TASKS_PER_WORKER = 2
WARMUP_SLEEP_MS = 20

#: How many warm-up waves at most before giving up on seeing every worker's pid.
WARMUP_MAX_WAVES = 10


def worker_context() -> multiprocessing.context.BaseContext:
    """How the peers built on multiprocessing (stdlib, pebble, mpire, mp.Pool) start their workers.

    Not by forking this process: it runs threads (the other pools', the probes'), and a
    child forked from it may inherit a lock one of them held (Python 3.12+ warns that it
    may deadlock). A forkserver is a single-threaded interpreter started once, which forks
    every worker with the bench's steps already imported: as cheap as a fork of this
    process, where spawning a fresh interpreter per worker costs ~0.5 s of CPU. Like the
    resource tracker, it lives until this interpreter exits. Its workers would see the
    environment of its own start: each pool hands them this process's (:func:`pool_options`).
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([bench_steps.__name__, "governor.workers.sandbox"])
    return context


def pool_options() -> Dict[str, Any]:
    """The start method and initializer of a multiprocessing peer's pool: workers from
    :func:`worker_context` that take this process's environment as it is now (a chat store
    allowed by ``allowing_stores`` after the forkserver started, say)."""
    return {"initializer": adopt_environment, "initargs": (dict(os.environ),)}


def adopt_environment(environ: Dict[str, str]) -> None:
    """In a worker: make ``environ`` its whole environment."""
    os.environ.clear()
    os.environ.update(environ)


class Peer:
    """A process pool under test (abstract).

    Args:
        workers: worker processes to give it.
    """

    #: The peer's name in the figures.
    name: str = ""

    #: The optional package it needs (the ``bench`` extra's), imported only in :meth:`start`.
    package: Optional[str] = None

    def __init__(self, workers: int):
        self.workers = workers
        self._warm_pids: set = set()

    @classmethod
    def unavailable(cls) -> Optional[str]:
        """Why this peer cannot run here (its optional package is missing), or ``None`` if it can."""
        if cls.package is not None and importlib.util.find_spec(cls.package) is None:
            return f"{cls.package} is not installed (pip install '.[bench]')"
        return None

    def start(self) -> "Peer":
        """Start the pool's workers; return ``self``."""
        raise NotImplementedError

    def submit(self, step: str, *args: Any) -> concurrent.futures.Future:
        """Run the bench step called ``step`` with ``args``; return its future."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Stop every worker and wait for them to exit."""
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        """The peer's configuration, for the JSON."""
        return {"workers": self.workers}

    def worker_pids(self) -> List[int]:
        """The pool's worker processes, as :meth:`warm` saw them (run a step)."""
        return sorted(self._warm_pids)

    def warm(self) -> int:
        """Run warm-up waves until every worker has run a step; return how many pids were seen."""
        seen = self._warm_pids
        for _ in range(WARMUP_MAX_WAVES):
            wave = [self.submit("sleep_ms", WARMUP_SLEEP_MS)
                    for _ in range(WARMUP_TASKS_PER_WORKER * self.workers)]
            seen.update(future.result() for future in wave)
            if len(seen) >= self.workers:
                break
        for _ in range(self.workers):
            self.submit("noop").result()
        return len(seen)

    def __enter__(self) -> "Peer":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()


class GovernorPeer(Peer):
    """Governor's Supervisor: steps go through the pool lane by name.

    Attributes:
        supervisor: the started Supervisor, for scenarios that need more than ``submit``
            (limits, cancels, metrics); ``None`` before :meth:`start`.
    """

    name = "governor"

    #: The pool lane's ``Supervisor(backend=...)``.
    backend = "loky"

    def __init__(self, workers: int):
        super().__init__(workers)
        self.supervisor: Optional[Supervisor] = None

    def start(self) -> "GovernorPeer":
        self.supervisor = Supervisor(bench_steps.registry, workers=self.workers, backend=self.backend).start()
        return self

    def submit(self, step: str, *args: Any) -> concurrent.futures.Future:
        return self.supervisor.submit(step, *args)

    def shutdown(self) -> None:
        if self.supervisor is not None:
            self.supervisor.shutdown(wait=True)

    def worker_pids(self) -> List[int]:
        """Every pool-lane worker, its idle spare included (any of them may take the next task)."""
        return sorted(worker["pid"] for worker in self.supervisor.describe_workers()
                      if worker["lane"] == "pool" and worker["pid"] is not None)

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "backend": self.backend}


class GovernorRayPeer(GovernorPeer):
    """Governor's Supervisor with its pool lane on the Ray this process initialised."""

    name = "governor-ray"
    backend = "ray"


class _FunctionPeer(Peer):
    """A peer that runs the step's function itself through an executor-like ``_submit``."""

    def __init__(self, workers: int):
        super().__init__(workers)
        self._functions: Dict[str, Callable[..., Any]] = {
            name: bench_steps.registry.get(name).fn for name in bench_steps.registry.names()}

    def submit(self, step: str, *args: Any) -> concurrent.futures.Future:
        return self._submit(self._functions[step], args)

    def _submit(self, fn: Callable[..., Any], args: tuple) -> concurrent.futures.Future:
        raise NotImplementedError


class _ExecutorPeer(_FunctionPeer):
    """A peer that is a ``concurrent.futures.Executor``: only its constructor differs."""

    def __init__(self, workers: int):
        super().__init__(workers)
        self._executor: Optional[concurrent.futures.Executor] = None

    def _make(self) -> concurrent.futures.Executor:
        raise NotImplementedError

    def start(self) -> "_ExecutorPeer":
        self._executor = self._make()
        return self

    def _submit(self, fn: Callable[..., Any], args: tuple) -> concurrent.futures.Future:
        return self._executor.submit(fn, *args)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)


class LokyPeer(_ExecutorPeer):
    """Raw loky: one ``loky.ProcessPoolExecutor`` with all the workers."""

    name = "loky"

    def _make(self) -> concurrent.futures.Executor:
        return loky.ProcessPoolExecutor(max_workers=self.workers)


class StdlibPeer(_ExecutorPeer):
    """The standard library's ``ProcessPoolExecutor``, its workers started by :func:`worker_context`."""

    name = "stdlib"

    def _make(self) -> concurrent.futures.Executor:
        return concurrent.futures.ProcessPoolExecutor(max_workers=self.workers, mp_context=worker_context(),
                                                      **pool_options())

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "start_method": worker_context().get_start_method()}


class PebblePeer(_FunctionPeer):
    """pebble's ``ProcessPool`` (futures from ``schedule``)."""

    name = "pebble"
    package = "pebble"

    def __init__(self, workers: int):
        super().__init__(workers)
        self._pool = None

    def start(self) -> "PebblePeer":
        import pebble  # optional: imported only when available (see unavailable())

        self._pool = pebble.ProcessPool(max_workers=self.workers, context=worker_context(), **pool_options())
        return self

    def _submit(self, fn: Callable[..., Any], args: tuple) -> concurrent.futures.Future:
        return self._pool.schedule(fn, args=args)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()


class MpirePeer(_FunctionPeer):
    """mpire's ``WorkerPool`` (``apply_async``, its result passed to a ``Future`` by its
    callback), its workers started from the forkserver of :func:`worker_context`; optional
    (the ``bench`` extra), skipped when missing."""

    name = "mpire"
    package = "mpire"

    def __init__(self, workers: int):
        super().__init__(workers)
        self._pool = None
        self._worker_init: Optional[Callable[[], None]] = None

    def start(self) -> "MpirePeer":
        import mpire  # optional: imported only when available (see unavailable())

        context = worker_context()  # its forkserver, with the bench's steps preloaded, is mpire's too
        options = pool_options()
        # mpire has no pool-wide initializer: apply_async takes one, run as each worker starts.
        self._worker_init = functools.partial(options["initializer"], *options["initargs"])
        self._pool = mpire.WorkerPool(n_jobs=self.workers, start_method=context.get_start_method(), keep_alive=True)
        return self

    def _submit(self, fn: Callable[..., Any], args: tuple) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._pool.apply_async(fn, args, callback=future.set_result, error_callback=future.set_exception,
                               worker_init=self._worker_init)
        return future

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.stop_and_join()

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "start_method": worker_context().get_start_method()}


class MpPoolPeer(_FunctionPeer):
    """The standard library's ``multiprocessing.Pool`` (``apply_async``, its result passed
    to a ``Future`` by the pool's result thread), its workers started by :func:`worker_context`.

    Attributes:
        pool: the started pool, for scenarios that use its own ``map``.
    """

    name = "mp-pool"

    def __init__(self, workers: int):
        super().__init__(workers)
        self.pool = None

    def start(self) -> "MpPoolPeer":
        self.pool = worker_context().Pool(self.workers, **pool_options())
        return self

    def _submit(self, fn: Callable[..., Any], args: tuple) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.pool.apply_async(fn, args, callback=future.set_result, error_callback=future.set_exception)
        return future

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "start_method": worker_context().get_start_method()}


#: Every peer, in the order they are started.
PEERS: List[Type[Peer]] = [MpPoolPeer, StdlibPeer, PebblePeer, MpirePeer, LokyPeer, GovernorPeer]
