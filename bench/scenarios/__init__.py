"""The scenarios, registered in :data:`bench.core.SCENARIOS` as their modules are imported.

Import order is run order (cheap and headline scenarios first), hence one import per line.
To add a scenario, write one function decorated with :func:`bench.core.scenario` in a
module here and import that module below. :func:`scenario_names` lives here, beside the
imports, so that whoever asks which scenarios there are has every one registered.
"""

from typing import Iterable, List, Optional

from governor.bench.core import SCENARIOS

# isort: off (import order is run order)
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
from governor.bench.scenarios import crash_keys  # noqa: F401
from governor.bench.scenarios import crash_load  # noqa: F401
from governor.bench.scenarios import ray_lane  # noqa: F401
# isort: on


def scenario_names(requested: Optional[Iterable[str]] = None, backend: str = "loky") -> List[str]:
    """The scenarios to run, in run order.

    Args:
        requested: names to run (default: every scenario of no particular backend and
            not :attr:`~bench.core.Scenario.named_only`, see :attr:`bench.core.Scenario.backend`).
        backend: the scenarios of this backend join the run (``"ray"`` adds ``ray``).

    Raises:
        KeyError: for an unknown name.
    """
    known = list(SCENARIOS)
    wanted = set(requested or (name for name in known
                               if SCENARIOS[name].backend is None and not SCENARIOS[name].named_only))
    unknown = wanted - set(SCENARIOS)
    if unknown:
        raise KeyError(f"unknown scenario(s) {sorted(unknown)}; known: {known}")
    wanted.update(name for name in known if SCENARIOS[name].backend == backend)
    return [name for name in known if name in wanted]
