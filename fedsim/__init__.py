"""fedsim: simulate federated and decentralized learning on one machine or a Ray cluster.

The public API an algorithm or plugin author builds on is re-exported here; built-in algorithms in
`fedsim.algorithms` use nothing else.
"""

__version__ = "0.1.0"

from .aggregation import Aggregator, make_batch  # noqa: E402
from .errors import FedsimError, ScenarioError  # noqa: E402
from .params import Params, UpdateBatch, num_bytes, stack, unstack, weighted_sum  # noqa: E402
from .registry import (  # noqa: E402
    register_aggregator,
    register_algorithm,
    register_dataset,
    register_model,
    register_topology,
)
from .scenario import AlgorithmConfig  # noqa: E402
from .server import ServerRounds  # noqa: E402
from .training import ClientResult, LocalSGDConfig, SGDTrainer, Trainer, TrainJob  # noqa: E402

__all__ = [
    "Aggregator", "AlgorithmConfig", "ClientResult", "FedsimError", "LocalSGDConfig", "Params",
    "SGDTrainer", "ScenarioError", "ServerRounds", "TrainJob", "Trainer", "UpdateBatch", "make_batch",
    "num_bytes", "register_aggregator", "register_algorithm", "register_dataset", "register_model",
    "register_topology", "stack", "unstack", "weighted_sum",
]

from .coordinator import RunContext  # noqa: E402

__all__ += ["RunContext"]
