"""fedsim: simulate federated and decentralized learning on one machine or a Ray cluster.

The public API an algorithm or plugin author builds on is re-exported here; built-in algorithms in
`fedsim.algorithms` use nothing else (tests/test_public_api.py checks it).
"""

__version__ = "0.1.0"

from .aggregation import Aggregator, Mean, ServerOptimizer, WeightedMean, combine, make_batch  # noqa: E402
from .checkpoint import checkpointable  # noqa: E402
from .data.base import DataInfo, DataPool, describes  # noqa: E402
from .errors import (  # noqa: E402
    ClientError,
    DataError,
    FedsimError,
    PluginError,
    ScenarioError,
    TopologyError,
)
from .params import Params, UpdateBatch, clone, num_bytes, stack, unstack, weighted_sum  # noqa: E402
from .registry import (  # noqa: E402
    register_aggregator,
    register_algorithm,
    register_dataset,
    register_model,
    register_topology,
)
from .sampling import hash_order, ordered_candidates  # noqa: E402
from .scenario import AlgorithmConfig  # noqa: E402
from .seeding import generator, torch_generator  # noqa: E402
from .server import ServerRounds  # noqa: E402
from .training import (  # noqa: E402
    ClientResult,
    LocalObjective,
    LocalSGDConfig,
    SGDTrainer,
    Trainer,
    TrainJob,
    TrainOutput,
)

__all__ = [
    "Aggregator", "AlgorithmConfig", "ClientError", "ClientResult", "DataError", "DataInfo", "DataPool", "FedsimError", "LocalObjective", "LocalSGDConfig", "TrainOutput",
    "Mean", "Params", "PluginError", "SGDTrainer", "ScenarioError", "ServerOptimizer", "ServerRounds",
    "TopologyError", "TrainJob", "Trainer", "UpdateBatch", "WeightedMean", "checkpointable", "clone", "combine",
    "describes",
    "generator", "hash_order", "make_batch", "num_bytes", "ordered_candidates", "register_aggregator",
    "register_algorithm", "register_dataset", "register_model", "register_topology", "stack", "torch_generator",
    "unstack", "weighted_sum",
]

from .coordinator import RunContext  # noqa: E402
from .network import Network  # noqa: E402
from .events import EventLoop  # noqa: E402
from .jobs import JobPool  # noqa: E402
from .asynchronous import Arrival, AsyncConfig, AsyncServer, staleness_weight  # noqa: E402
from .decentralized import (  # noqa: E402
    DecentralizedConfig,
    GraphRounds,
    NodeEvaluator,
    initial_nodes,
    layer_variance,
    require_neighbourhoods,
)
from .scenario import rule_min_clients  # noqa: E402
from .topologies import require_connected  # noqa: E402
from .lora import LORA_A, LORA_B, adapter_pairs, bytes_of, is_adapter, trainable_names  # noqa: E402

__all__ += [
    "Arrival", "AsyncConfig", "AsyncServer", "DecentralizedConfig", "EventLoop", "GraphRounds", "JobPool", "Network",
    "NodeEvaluator", "RunContext", "initial_nodes", "layer_variance", "require_connected", "staleness_weight",
    "require_neighbourhoods", "rule_min_clients",
    "LORA_A", "LORA_B", "adapter_pairs", "bytes_of", "is_adapter", "trainable_names",
]

from .params import inner_product, squared_distance  # noqa: E402
from .models import representation  # noqa: E402
from .personal import KeepLocal, keep_local_rounds, split_by_prefix, summarize_client_accuracy  # noqa: E402
from .server_optim import FedAdagrad, FedAdam, FedYogi, ServerOptConfig, ServerSGD, build_server_optimizer  # noqa: E402

__all__ += [
    "FedAdagrad", "FedAdam", "FedYogi", "ServerOptConfig", "ServerSGD", "build_server_optimizer",
    "inner_product", "split_by_prefix", "squared_distance", "summarize_client_accuracy",
    "KeepLocal", "keep_local_rounds", "representation",
]

from .compression import (  # noqa: E402
    QSGD,
    CompressionConfig,
    Identity,
    RandomK,
    ScaledSign,
    TopK,
    build_compressor,
    choco_gossip,
    compress_stacked,
    error_feedback,
)

__all__ += [
    "CompressionConfig", "Identity", "QSGD", "RandomK", "ScaledSign", "TopK", "build_compressor", "choco_gossip",
    "compress_stacked", "error_feedback",
]

from .api import RunResult, SweepResult, load_runs, run  # noqa: E402

__all__ += ["RunResult", "SweepResult", "load_runs", "run"]
