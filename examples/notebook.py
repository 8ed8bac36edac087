# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # fedsim from a notebook
#
# A percent-format script: run it with `python examples/notebook.py`, or open it as a notebook
# (VS Code, PyCharm and JupyterLab with Jupytext read the `# %%` cells). It runs a small sweep,
# loads every run into one tidy DataFrame and compares learning rates. Runs land in
# `runs/notebook/` (or `$FEDSIM_NOTEBOOK_OUT`), as `fedsim run` would put them: plot, resume or
# track them like any other.

# %%
import os

import matplotlib

matplotlib.use("Agg")  # remove this line in a notebook to see the figure inline
import matplotlib.pyplot as plt

import fedsim

OUT = os.environ.get("FEDSIM_NOTEBOOK_OUT", "runs/notebook")

# %% [markdown]
# A scenario can be a file path, TOML text or a dict. Here: TOML text with a sweep over two
# learning rates and two seeds, on the inline executor (no Ray to start for a run this small).

# %%
SCENARIO = """
name = "nb"
rounds = 5

[data]
dataset = "synthetic"
num_clients = 12
samples_per_client = 60
test_size = 400

[model]
name = "mlp"
hidden = [32]

[algorithm]
name = "fedavg"
clients_per_round = 4
batch_size = 16

[system]
executor = "inline"

[sweep]
seed = [0, 1]
"algorithm.lr" = [0.02, 0.2]
"""

sweep = fedsim.run(SCENARIO, out=OUT)
sweep

# %% [markdown]
# One `RunResult` per sweep point: its folder, its metrics as a DataFrame, its summary.

# %%
first = sweep[0]
print(first.run_dir, first.swept, f"final accuracy {first.summary['final_accuracy']:.3f}")
first.metrics.tail(3)

# %% [markdown]
# Overrides take dotted keys, like `--set` on the command line; a dict works as the scenario too.

# %%
single = fedsim.run({"name": "nb-single", "rounds": 3, "data": {"num_clients": 8, "samples_per_client": 40,
                                                                "test_size": 200},
                     "algorithm": {"name": "fedavg", "clients_per_round": 4}, "system": {"executor": "inline"}},
                    out=OUT, overrides={"algorithm.lr": 0.1})
single.summary["final_accuracy"]

# %% [markdown]
# `fedsim.load_runs` reads any runs (folders, folders of runs, runs.csv files) into one tidy frame
# with a column per swept key, ready for `groupby` or seaborn.

# %%
tidy = fedsim.load_runs(sweep.run_dirs)
final = tidy[tidy["round"] == tidy["round"].max()].groupby("algorithm.lr")["test_accuracy"].agg(["mean", "min", "max"])
final

# %%
fig, ax = plt.subplots(figsize=(5, 3))
for lr, runs in tidy.groupby("algorithm.lr"):
    curve = runs.groupby("round")["test_accuracy"].mean()
    ax.plot(curve.index, curve.values, label=f"lr = {lr}")
ax.set_xlabel("round")
ax.set_ylabel("test accuracy (mean over seeds)")
ax.legend()
fig.savefig(os.path.join(OUT, "by-lr.png"), dpi=100)
