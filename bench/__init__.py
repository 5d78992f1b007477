"""Governor's benchmark harness: measured, never asserted.

Run it as ``python -m governor.bench`` (see ``python -m governor.bench --help`` and ``bench/README.md``), or
from Python::

    from governor import bench
    bench_run = bench.run(scenarios=["overhead"], size="quick", json_path="out.json")

Modules:

* :mod:`bench.core`: sizes, the scenario registry, :class:`~bench.core.ScenarioResult`;
* :mod:`bench.scenarios`: one module per scenario (view-switch, view-real, overhead,
  governor, memory, scaling, daemon; ray with ``backend="ray"``);
* :mod:`bench.bench_steps`: the steps, in their own ``StepRegistry``;
* :mod:`bench.peers`: Governor (on loky or on Ray) and its peers (loky, stdlib, pebble, mpire, mp.Pool)
  behind one adapter;
* :mod:`bench.probes`: resolution stamps, death watches, worker discovery;
* :mod:`bench.stats`: percentiles and summaries;
* :mod:`bench.runner`, :mod:`bench.report`, :mod:`bench.plot`: the JSON, the table and
  markdown, the picture.

The harness is imported on first use, not with the package: worker processes import
``bench.bench_steps``, and a worker that loaded the whole harness (and with it Governor's
engine) would overstate the memory figures the harness reports.
"""

_LAZY = {"SCENARIOS": "governor.bench.core", "SIZES": "governor.bench.core", "SCHEMA_VERSION": "governor.bench.runner",
         "BenchRun": "governor.bench.runner", "run": "governor.bench.runner"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'governor.bench' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
