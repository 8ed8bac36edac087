"""Server- and client-side cost of federated fine-tuning: Ferret's projection and reconstruction,
and LoRA-FAIR's server step.

- Ferret: throughput (parameters per second) of projecting an update onto K = 200 shared random
  directions per block (client side) and of reconstructing the update from the coordinates
  (server side, with per-direction clipping), for a ~1M-parameter MLP and the 22.7M-parameter
  MiniLM layout (real shapes, random values), with the paper's i.i.d. truncated-normal directions
  and with the rank-one "kron" directions. The i.i.d. construction costs K * d random draws, so
  for 22M it is timed at a smaller K and scaled linearly in K (stated in the output).
- LoRA-FAIR: server time per round for MiniLM-sized adapters (rank 8 on q, k, v and o of 6
  layers, 384 x 384 each) from 10 clients, beside FedIT and FlexLoRA.

Target (issue 6): Ferret projection of a 22M-parameter update with K = 200 under 2 s on 2 cores.

    python benchmarks/finetune.py [--threads 2] [--repeat 3]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

from fedsim import UpdateBatch
from fedsim.algorithms.ferret import decode, encode, plan_blocks, seed_pool
from fedsim.algorithms.lora_fair import FedIT, FlexLoRA, LoRAFair
from fedsim.training import torch_threads

H, FFN, LAYERS, VOCAB = 384, 1536, 6, 30522


def minilm_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """all-MiniLM-L6-v2's trainable tensors in model order (22.7M parameters)."""
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("emb.word", (VOCAB, H)), ("emb.pos", (512, H)), ("emb.type", (2, H)), ("emb.ln.w", (H,)), ("emb.ln.b", (H,)),
    ]
    for i in range(LAYERS):
        p = f"layer{i}."
        for proj in ("q", "k", "v"):
            shapes += [(p + proj + ".w", (H, H)), (p + proj + ".b", (H,))]
        shapes += [(p + "o.w", (H, H)), (p + "o.b", (H,)), (p + "ln1.w", (H,)), (p + "ln1.b", (H,))]
        shapes += [(p + "ffn1.w", (FFN, H)), (p + "ffn1.b", (FFN,)), (p + "ffn2.w", (H, FFN)), (p + "ffn2.b", (H,))]
        shapes += [(p + "ln2.w", (H,)), (p + "ln2.b", (H,))]
    return shapes


def mlp_1m_shapes() -> list[tuple[str, tuple[int, ...]]]:
    return [("fc1.w", (1024, 976)), ("fc1.b", (1024,)), ("head.w", (10, 1024)), ("head.b", (10,))]


def timed(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ferret_case(shapes: list[tuple[str, tuple[int, ...]]], kind: str, k: int, repeat: int) -> dict[str, float]:
    blocks = plan_blocks(shapes)
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(b.size, generator=g) * 1e-3 for b in blocks]
    d = sum(b.size for b in blocks)
    seeds = seed_pool(0, k)
    gamma, _ = encode(deltas, blocks, seeds, kind)
    t_proj = timed(lambda: encode(deltas, blocks, seeds, kind), repeat)
    t_rec = timed(lambda: decode(gamma, blocks, seeds, kind, clip=10.0), repeat)
    return {"parameters": d, "blocks": len(blocks), "K": k, "project_s": t_proj, "reconstruct_s": t_rec,
            "project_params_per_s": d / t_proj, "reconstruct_params_per_s": d / t_rec}


def scaled(case: dict[str, float], k: int) -> dict[str, float]:
    """Scale an i.i.d. timing measured at a smaller K to K (the cost is K * d draws)."""
    f = k / case["K"]
    out = dict(case)
    out.update(K=k, measured_at_K=case["K"], project_s=case["project_s"] * f, reconstruct_s=case["reconstruct_s"] * f,
               project_params_per_s=case["project_params_per_s"] / f,
               reconstruct_params_per_s=case["reconstruct_params_per_s"] / f)
    return out


def lora_fair_case(clients: int, rank: int, repeat: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    params, glob = {}, {}
    for i in range(LAYERS):
        for proj in ("query", "key", "value", "attention.output.dense"):
            prefix = f"encoder.layer.{i}.{proj}."
            a0 = torch.randn(rank, H, generator=g) / H**0.5
            params[prefix + "lora_A"] = a0 + 0.3 * torch.randn(clients, rank, H, generator=g) / H**0.5
            params[prefix + "lora_B"] = 0.01 * torch.randn(clients, H, rank, generator=g)
            glob[prefix + "lora_A"], glob[prefix + "lora_B"] = a0, torch.zeros(H, rank)
    params["head.weight"] = torch.randn(clients, 2, H, generator=g)
    glob["head.weight"] = torch.zeros(2, H)
    batch = UpdateBatch(params, torch.full((clients,), 100), torch.arange(clients), torch.zeros(clients, dtype=torch.int64))
    out: dict[str, float] = {"clients": clients, "rank": rank, "adapter_pairs": LAYERS * 4}
    for name, rule in (("fedit", FedIT()), ("flexlora", FlexLoRA()), ("lora_fair", LoRAFair())):
        out[f"{name}_server_s_per_round"] = timed(lambda: rule(glob, batch, round=1), repeat)
    fair = LoRAFair()
    fair(glob, batch, round=1)
    out["lora_fair_stats"] = fair.stats_
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--iid-22m-k", type=int, default=10, help="K at which the i.i.d. 22M case is timed, then scaled")
    args = parser.parse_args()
    result: dict[str, object] = {
        "benchmark": "finetune",
        "torch": torch.__version__,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        # Other processes share the cores: with more runnable threads than cores, torch's
        # multi-threaded kernels lose more to waiting than they gain; read timings with this.
        "load_average_1min": os.getloadavg()[0],
    }
    with torch_threads(args.threads):
        ferret = {
            "mlp_1M_kron": ferret_case(mlp_1m_shapes(), "kron", args.k, args.repeat),
            "mlp_1M_iid": ferret_case(mlp_1m_shapes(), "iid", args.k, 1),
            "minilm_22M_kron": ferret_case(minilm_shapes(), "kron", args.k, args.repeat),
            "minilm_22M_iid": scaled(ferret_case(minilm_shapes(), "iid", args.iid_22m_k, 1), args.k),
        }
        result["ferret"] = ferret
        result["target_22M_projection_under_2s"] = {
            "kron": ferret["minilm_22M_kron"]["project_s"] < 2.0,
            "iid": ferret["minilm_22M_iid"]["project_s"] < 2.0,
        }
        result["lora_fair_minilm_adapters"] = lora_fair_case(10, 8, args.repeat)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
