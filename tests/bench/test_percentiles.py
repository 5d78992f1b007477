"""One percentile definition: the supervisor's metrics and the bench agree, and both are numpy's default."""

import hypothesis.strategies as st
import numpy
import pytest
from hypothesis import given

from governor.bench.stats import Summary, percentile
from governor.engine.metrics import Histogram, percentiles

samples = st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=300)


@given(samples)
def test_metrics_and_bench_give_the_same_p50_p95_p99_as_numpy(values):
    histogram = Histogram([1.0])
    for value in values:
        histogram.observe(value)
    metrics = histogram.summary()
    bench = Summary.of(values, unit="MiB")
    expected = numpy.percentile(values, [50, 95, 99])  # method="linear", numpy's default
    for name, want in zip(("p50", "p95", "p99"), expected):
        assert metrics[name] == pytest.approx(want, rel=1e-9, abs=1e-9)
        assert getattr(bench, name) == metrics[name], "one definition, not two"


def test_the_p95_of_twenty_samples_is_interpolated_not_a_nearest_rank():
    values = list(range(1, 21))  # nearest rank would say 19
    assert percentiles(values, (95,)) == [pytest.approx(19.05)]
    assert percentile(values, 95) == pytest.approx(19.05)


def test_edges():
    assert percentiles([], (50, 99)) == [None, None]
    assert percentiles([7.0], (0, 50, 100)) == [7.0, 7.0, 7.0]
    assert percentiles([3, 1, 2], (0, 100)) == [1, 3]
    with pytest.raises(ValueError, match="whole numbers"):
        percentiles([1, 2], (99.9,))
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
