"""What `fedsim run` checks before it starts, and `fedsim validate` checks too.

One function for both commands, so that `validate` saying ok means `run` starts: the data set's
files are there, the partition can split this data set this way, the topology can be built on
this many nodes and is connected, and the memory estimate fits. Each check is cheap (headers and
counts, a graph of N nodes, no training data decoded) except for data sets that cannot describe
themselves, which `validate` loads in full.
"""

from __future__ import annotations

import warnings
from typing import Any

from .errors import FedsimError, PluginError, ScenarioError


def preflight(
    spec: Any, *, force: bool = False, executor: str | None = None, workers: int | None = None,
    available: int | None = None, load_undescribed: bool = False,
) -> dict[str, int]:
    """Raise the one-line error `run` would hit first; return the memory estimate (bytes by part).

    `force` skips only the memory refusal (as `--force` does). `load_undescribed` builds the whole
    federation for a data set without a `describe` (a plugin's): `validate` wants that certainty,
    while `run` is about to build it anyway.
    """
    try:
        require_extras(spec)
        info = _data(spec, load_undescribed)
        if info is not None:
            _partition(spec, info)
        from .resources import check

        # the estimate first: it is arithmetic, while a graph of a billion nodes would be built
        parts = check(spec, force=force, available=available, executor=executor, workers=workers)
        if info is not None:
            _model(spec, info, parts["model"])
        _topology(spec)
        return parts
    except FedsimError as exc:
        raise exc.located(file=spec.source) from None


def require_extras(spec: Any) -> None:
    """The optional packages the scenario's tables need, found before anything runs: a missing one
    found at the first row would leave a half-made run folder that the next run refuses."""
    import importlib.util

    from .tracking import check_available

    s = spec.scenario
    if s.privacy is not None and importlib.util.find_spec("dp_accounting") is None:
        raise ScenarioError("privacy accounting needs dp-accounting, which this Python environment lacks: "
                            "pip install 'fedsim[privacy]' with the pip of fedsim's own environment "
                            "(e.g. .venv/bin/pip)", key="privacy")
    if s.tracking is not None:
        check_available(s.tracking.backends)


def _data(spec: Any, load_undescribed: bool) -> Any:
    from .data.base import build_federated_data, describe
    from .data.lazy import wants_lazy

    s = spec.scenario
    if s.data.dataset == "synthetic" and wants_lazy(s.data):
        if s.data.partition not in ("natural", "auto"):
            raise ScenarioError('a lazily generated Synthetic federation only supports partition = "natural"',
                                key="data.partition")
        return None
    try:
        info = describe(s.data, s.seed)
        if info is None and load_undescribed:
            build_federated_data(s.data, s.seed)
    except FedsimError as exc:
        raise exc.located(key="data") from None
    return info


def _model(spec: Any, info: Any, model_bytes: int) -> None:
    """The model builds and gives one logit per class for this data, as the run will check. A model
    of up to `_REAL_CHECK_BYTES` (by the memory estimate's count; 0 where that is unknown) is built
    and run for real, in milliseconds; a larger one on PyTorch's meta device (shapes without
    storage), whose forward pass costs about a second of imports but allocates nothing."""
    import numpy as np
    import torch

    from . import registry
    from .models import build_model, check_outputs, output_of_one, require_logits

    s = spec.scenario
    shape, classes = tuple(info.input_shape), int(info.num_classes)
    try:
        key = (registry.models.get(s.model.name), repr(sorted(s.model.options().items())), shape, classes)
    except FedsimError as exc:
        raise exc.located(key="model.name") from None
    if key in _MODELS_CHECKED:  # a sweep's points mostly share their model
        return
    def real() -> None:
        model = build_model(s.model.name, s.model.options(), shape, classes, s.seed)
        check_outputs(model, s.model.name, np.zeros((1, *shape), dtype=np.float32), classes)

    try:
        if model_bytes < _REAL_CHECK_BYTES:
            real()
        else:
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # (loading saved weights into shapes is a no-op there)
                    model = build_model(s.model.name, s.model.options(), shape, classes, s.seed)
                    out = output_of_one(model, s.model.name, torch.zeros((1, *shape)))
            except PluginError:  # a factory or layer that needs real tensors: as the run will build it
                real()
            else:
                require_logits(out, s.model.name, classes)
    except FedsimError as exc:
        raise exc.located(key="model") from None
    _MODELS_CHECKED.add(key)


_MODELS_CHECKED: set[tuple[Any, ...]] = set()  # (factory, options, input shape, classes) that passed
_REAL_CHECK_BYTES = 200 * 2**20  # one copy of the parameters: cheap to build for real below this


def _partition(spec: Any, info: Any) -> None:
    from .data.partition import precheck

    try:
        precheck(spec.scenario.data, info.num_train, info.num_classes, info.natural_clients)
    except FedsimError as exc:
        raise exc.located(key="data.partition") from None


def _topology(spec: Any) -> None:
    """Build the run's graph as the run will (same seed) and require it connected."""
    import inspect

    from . import registry
    from .errors import TopologyError
    from .seeding import generator

    s = spec.scenario
    if s.topology is None:
        return
    from .topologies import build, require_connected

    topo = s.topology
    options = {"seed": int(generator(s.seed, "topology").integers(2**31)), **topo.options()}
    try:
        graph = build(topo.name, s.data.num_clients, **options)
        require_connected(graph, f"{spec.algorithm_config.name} (gossip averaging)")
        if topo.time_varying and "seed" not in inspect.signature(registry.topologies.get(topo.name)).parameters:
            raise TopologyError(f"'{topo.name}' is not random, so it cannot vary over time", key="topology.time_varying")
    except FedsimError as exc:
        raise exc.located(key="topology") from None
    size = getattr(spec.algorithm_config, "neighbourhood_size", None)
    if size is not None:  # a rule needing more models than a node's merge holds (Krum on a ring)
        from .decentralized import require_neighbourhoods
        from .scenario import rule_min_clients

        require_neighbourhoods(graph, *rule_min_clients(s), size)

