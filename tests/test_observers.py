import numpy as np
import pytest

from edgeq.observers import HistogramObserver, MinMaxObserver


def test_minmax_includes_zero():
    obs = MinMaxObserver()
    obs.update(np.array([1.0, 3.0]))
    obs.update(np.array([2.0, 5.0]))
    assert obs.range() == (0.0, 5.0)


def test_histogram_growth_keeps_every_count_and_matches_the_data():
    rng = np.random.default_rng(0)
    obs = HistogramObserver("percentile")
    batches = [rng.standard_normal(5000) * (1 + 3 * i) for i in range(8)]
    for b in batches:
        obs.update(b)
    assert obs.counts.sum() == sum(b.size for b in batches)
    assert obs.counts.shape == (2048,)  # memory does not grow with batches
    everything = np.concatenate(batches)
    edges = obs.lo + obs.width * np.arange(obs.bins + 1)
    assert edges[0] <= everything.min() and edges[-1] >= everything.max()
    direct, _ = np.histogram(everything, bins=edges)
    # bins merge exactly, so the only difference from a one-shot histogram is float rounding at bin edges
    assert np.abs(direct - obs.counts).sum() <= 0.001 * everything.size


def test_percentile_clips_outliers_but_minmax_does_not():
    rng = np.random.default_rng(1)
    data = np.concatenate([rng.standard_normal(100000), [1000.0]])
    perc, mm = HistogramObserver("percentile", percentile=99.9), MinMaxObserver()
    perc.update(data)
    mm.update(data)
    assert mm.range()[1] == 1000.0
    assert perc.range()[1] < 10.0


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_search_methods_give_ranges_inside_the_data(method):
    rng = np.random.default_rng(2)
    obs = HistogramObserver(method)
    relu = np.maximum(rng.standard_normal(200000), 0)
    relu[0] = 40.0  # one outlier
    obs.update(relu)
    lo, hi = obs.range()
    assert lo == 0.0 and 1.0 < hi < 40.0


def test_all_zero_tensor_gives_a_zero_range():
    obs = HistogramObserver("mse")
    obs.update(np.zeros(100))
    assert obs.range() == (0.0, 0.0)
