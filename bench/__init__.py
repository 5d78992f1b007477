"""Governor's benchmark harness: measured, never asserted.

Run it as ``python -m bench`` (see ``python -m bench --help`` and ``bench/README.md``), or
from Python::

    import bench
    bench_run = bench.run(scenarios=["overhead"], size="quick", json_path="out.json")

Modules:

* :mod:`bench.core`: sizes, the scenario registry, :class:`~bench.core.ScenarioResult`;
* :mod:`bench.scenarios`: one module per scenario (view-switch, overhead, governor,
  memory, scaling);
* :mod:`bench.bench_steps`: the steps, in their own ``StepRegistry``;
* :mod:`bench.peers`: Governor and its peers (loky, stdlib, pebble) behind one adapter;
* :mod:`bench.probes`: resolution stamps, death watches, worker discovery;
* :mod:`bench.stats`: percentiles and summaries;
* :mod:`bench.runner`, :mod:`bench.report`, :mod:`bench.plot`: the JSON, the table and
  markdown, the picture.
"""

from bench.core import SCENARIOS, SIZES
from bench.runner import SCHEMA_VERSION, BenchRun, run

__all__ = ["SCENARIOS", "SCHEMA_VERSION", "SIZES", "BenchRun", "run"]
