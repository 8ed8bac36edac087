"""An example plug-in: two Byzantine-robust aggregation rules in a few lines each.

Use them from a scenario without installing anything, by module path:

    [aggregator]
    name = "examples.robust_rules:TrimmedMean"
    trim = 0.2

A class found this way must declare itself a rule: it subclasses `fedsim.Aggregator` (or is
registered with `@register_aggregator`). Or register them by name with `@register_aggregator` in a package you install, or list them under
the entry-point group `fedsim.aggregators` in that package's pyproject.toml.
"""

from __future__ import annotations


from fedsim import Aggregator, Params, UpdateBatch


class CoordinateMedian(Aggregator):
    """Coordinate-wise median of the clients' parameters (Yin et al., 2018)."""

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        return {name: t.median(dim=0).values for name, t in batch.params.items()}


class TrimmedMean(Aggregator):
    """Coordinate-wise mean after dropping the `trim` fraction of largest and smallest values."""

    def __init__(self, trim: float = 0.1):
        if not 0 <= trim < 0.5:
            raise ValueError("trim must lie in [0, 0.5)")
        self.trim = trim

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        n = len(batch)
        k = int(self.trim * n)
        # Integer buffers (BatchNorm's num_batches_tracked) have no mean; their median is a client's count.
        return {
            name: t.sort(dim=0).values[k : n - k].mean(dim=0) if t.is_floating_point() else t.median(dim=0).values
            for name, t in batch.params.items()
        }
