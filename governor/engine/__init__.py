"""The in-process executor: the :class:`~governor.engine.supervisor.Supervisor`, its manager
thread, and the lanes that hand tasks to worker processes.

Public names are re-exported by ``governor`` itself (``from governor import Supervisor``).
"""
