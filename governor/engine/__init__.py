"""The in-process executor: the :class:`~governor.engine.supervisor.Supervisor`, its manager
thread, and the lanes that hand tasks to worker processes.

Public names are re-exported by ``governor`` itself (``from governor import Supervisor``).

The whole executor, from ``submit()`` to the future (threads in the supervisor's process
on the left, other processes on the right)::

  caller's thread                 manager thread (one; owns every lane, slot, timer, run)
  ───────────────                 ──────────────────────────────────────────────────────
  Supervisor.submit(step, ...)
    route + check the arguments
    Manager.admit: queue count  ─┐
    number the task              │ (under the supervisor's lock: the submission order)
    Manager.enqueue ─> inbox ────┘
    Manager.wake ── 1 byte on the wake-up pipe, only if the manager sleeps ──┐
                                                                             v
                                  ReadSelector.ready(timeout = next deadline)   (epoll)
                                    ├─ wake-up pipe  -> drain the inbox: the task joins
                                    │                   its lane's queue (_on_submit)
                                    ├─ worker socket -> Outcome (lanes._on_outcome)
                                    ├─ worker pidfd  -> its death (lanes._on_dead)
                                    └─ deadline      -> timeout, cancel grace, RSS sample
                                  LocalLanes.dispatch                    worker process
                                    queue -> idle slot                   (forked from the
                                    Manager.dispatching: count it out,    warm template)
                                      on_dispatch (a journal's "started")  ────────────
                                    Slot.send ── Assignment ── task socket ──> serve():
                                                                            run_step(step)
                                    _on_outcome <── Outcome ── task socket ──  ...
                                    Manager.conclude_outcome
                                    Manager.conclude: the one end of a task
                                      state, queue count, metrics, log, workflow
                                      future resolved (at once, or at the end of
                                      the turn when tasks wait for a worker)
  future.result() <── set_result / set_exception ──┘
  done-callbacks: on the callback runner's thread (governor.callbacks), never the manager's

  future.cancel(): a queued task ends on the caller's thread (Manager.conclude_queued_cancel);
  a running one is a Cancel down the worker's control socket, then a kill after its grace.
  The warm template (governor.workers.template) forks every worker; a spawn thread starts
  a new template when one dies; a cleanup thread removes a gone worker's temp dir.

Where each part lives: ``supervisor`` (the API), ``routes`` (a step's lane, limits,
signature and lane key), ``manager`` (the loop, the queue counts, ``conclude`` and
retries), ``backend`` (what a lane backend is, and the selector), ``lanes`` (the local
lanes: dispatch, key order, limits, deaths), ``starts`` (the template, forks, a new
worker's handshake), ``slots`` (one worker's seat, its send path, send-ahead, a lane's
slots by state), ``queues`` (the pool lane's priority order), ``mapping`` (the bounded
``map``), ``ray_lane`` (the pool lane on Ray), ``timers``, ``metrics``; the messages on the
sockets are ``governor.workers.messages``.
"""
