"""`fedsim plot --partition SCENARIO`: each client's label distribution as a stacked bar.

Seeing the split before spending hours on a run is the point (Flower Datasets draws the same
figure): a Dirichlet alpha or a classes_per_client that looks reasonable on paper can leave half the
clients with one class. The data is built exactly as `fedsim run` builds it (same seed, same
partition stream), so the figure is the federation the run will train on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .data.heterogeneity import figures, label_counts  # noqa: E402
from .plotting import check_output, save_image  # noqa: E402

MAX_BARS = 100  # beyond this many clients, bars of the first MAX_BARS clients (the figures use all)
MAX_LEGEND = 20  # classes named in the legend; more (Shakespeare's 80 characters) only coloured


def partition_title(data_cfg: Any) -> str:
    """The partition in words, with the dial that shapes it."""
    scheme = data_cfg.partition
    dials = {
        "dirichlet": f"alpha = {data_cfg.alpha:g}",
        "dirichlet_sizes": f"alpha = {data_cfg.alpha:g}, size_alpha = {data_cfg.size_alpha:g}",
        "label_quantity": f"{data_cfg.classes_per_client} classes per client",
        "shards": f"{data_cfg.shards_per_client} shards per client",
        "quantity": f"sigma = {data_cfg.quantity_sigma:g}",
    }
    dial = dials.get(scheme)
    return f"{data_cfg.dataset}, partition {scheme}" + (f" ({dial})" if dial else "")


def plot_partition(spec: Any, out: str | Path, *, normalize: bool = False) -> tuple[Path, dict[str, float]]:
    """Build the scenario's federation, draw its clients' label counts, return (file, figures)."""
    from .coordinator import _located
    from .data import build_federated_data

    out = check_output(out)  # before building the federation, which can take a while
    s = spec.scenario
    data = _located(lambda: build_federated_data(s.data, s.seed), spec, "data")
    ids, counts = label_counts(data, s.seed)
    stats = figures(counts)
    shown = min(len(ids), MAX_BARS)
    ids, bars = ids[:shown], counts[:shown].astype(np.float64)
    if normalize:
        bars = bars / np.maximum(bars.sum(axis=1, keepdims=True), 1)
    classes = bars.shape[1]
    cmap = plt.get_cmap("tab10" if classes <= 10 else "tab20" if classes <= 20 else "viridis")
    colours = [cmap(c if classes <= 20 else c / max(classes - 1, 1)) for c in range(classes)]
    fig, ax = plt.subplots(figsize=(min(max(8.0, 3 + 0.12 * shown), 16), 4.2), constrained_layout=True)
    x = np.arange(shown)
    bottom = np.zeros(shown)
    for c in range(classes):
        ax.bar(x, bars[:, c], bottom=bottom, width=0.85, color=colours[c], label=str(c), linewidth=0)
        bottom += bars[:, c]
    ax.set_xlabel("client" + (f" (first {shown} of {data.num_clients})" if shown < data.num_clients else ""))
    ax.set_ylabel("share of the client's examples" if normalize else "examples")
    ax.set_xlim(-0.6, shown - 0.4)
    if shown <= 40:
        ax.set_xticks(x, [str(int(i)) for i in ids], fontsize=7)
    if classes <= MAX_LEGEND:
        ax.legend(title="label", fontsize=7, title_fontsize=8, ncols=1 if classes <= 10 else 2,
                  loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_title(
        f"{partition_title(s.data)}, {data.num_clients} clients\n"
        f"label entropy {stats['label_entropy_mean']:.2f} bits per client (pooled {stats['label_entropy_global']:.2f}); "
        f"EMD to pooled labels {stats['label_emd_mean']:.2f} (0 = IID, 2 = disjoint)",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    try:
        save_image(fig, out, dpi=110)
    finally:
        plt.close(fig)
    return out, stats
