"""The scenarios, registered in :data:`bench.core.SCENARIOS` as their modules are imported.

Import order is run order (cheap and headline scenarios first), hence one import per line.
To add a scenario, write one function decorated with :func:`bench.core.scenario` in a
module here and import that module below.
"""

# isort: off
from governor.bench.scenarios import view_switch  # noqa: F401
from governor.bench.scenarios import view_real  # noqa: F401
from governor.bench.scenarios import view_load  # noqa: F401
from governor.bench.scenarios import overhead  # noqa: F401
from governor.bench.scenarios import governor_limits  # noqa: F401
from governor.bench.scenarios import memory  # noqa: F401
from governor.bench.scenarios import scaling  # noqa: F401
from governor.bench.scenarios import daemon  # noqa: F401
from governor.bench.scenarios import sandbox  # noqa: F401
from governor.bench.scenarios import chaos  # noqa: F401
from governor.bench.scenarios import ray_lane  # noqa: F401
