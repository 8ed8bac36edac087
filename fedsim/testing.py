"""Conformance suites for plug-ins, like scikit-learn's `check_estimator`.

`check_aggregator(rule)` calls a rule on made-up cohorts and raises AssertionError, in one line
naming the rule, the property and the key, at the first property it breaks. `check_flow(build,
scenario)` runs an algorithm for a few rounds, resumes it from a mid-run checkpoint and asserts that
the curves and the final state are those of the uninterrupted run.

Both exist because the engine cannot see these mistakes while it runs: a rule that returns other
keys leaves a frozen model, a rule that depends on client order or keeps its state where checkpoints
do not look changes results with the executor or after a resume, and a flow whose declared state
misses one attribute resumes to different curves without a word.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import math
import random
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NoReturn

import numpy as np
import torch
from torch import Tensor

from . import checkpoint
from .aggregation import Aggregator, rule_name
from .errors import FedsimError
from .params import Params, UpdateBatch

# ---------------------------------------------------------------------------------------------
# aggregation rules

TAGS: dict[str, Any] = {
    "stateful": False,
    "min_clients": 1,
    "uses_weights": True,
    "server_optimizer": False,
}
"""The tags a rule may declare (`tags = {...}` on its class) and their defaults:

- `stateful`: the rule learns across rounds (server momentum, Adam's moments), so two calls on the
  same input may differ. Otherwise a second identical call must give the same output, which
  catches a rule that learns without saying so.
- `min_clients`: the smallest cohort the rule accepts (Krum with f attackers needs 2f + 3); a
  `min_clients` attribute or property on the rule says the same. Cohorts from this size up to the
  suite's are checked.
- `uses_weights`: the rule reads `batch.weights()` (example counts, or the merge point's
  coefficients). Then only relative example counts may matter (multiplying every count by 7
  changes nothing); with False the output must not depend on counts or coefficients.
- `server_optimizer`: the rule steps from the batch's centre like an optimiser (FedAdam written
  as a rule rather than as a `ServerOptimizer`), so clients that all send the same x move the
  output toward x instead of landing on it. The identity check then asks for that movement.
"""

INT_BUFFER = "bn.num_batches_tracked"
_SHAPES = {"layer.weight": (4, 3), "layer.bias": (4,), "head.weight": (2, 4)}


def example_batch(
    num_clients: int = 6, seed: int = 0, *, int_buffer: bool = False, relative: bool = False,
) -> tuple[Params, UpdateBatch]:
    """Global parameters and a cohort of `num_clients` clients.

    Models (`relative = False`, as server rounds, graphs, gossip and MoDeST merge) are scattered
    around the global ones, weighted by example counts. Updates (`relative = True`, as event-driven
    servers merge) are scattered around zero and carry coefficients that sum to one, as a
    normalised merge would. With `int_buffer`, both hold an int64 counter like BatchNorm's
    `num_batches_tracked`, different for every client (clients train different numbers of steps).
    """
    g = torch.Generator().manual_seed(seed)
    global_params = {k: torch.randn(s, generator=g) for k, s in _SHAPES.items()}
    spread = {k: 0.5 * torch.randn((num_clients, *v.shape), generator=g) for k, v in global_params.items()}
    stacked = spread if relative else {k: global_params[k] + v for k, v in spread.items()}
    if int_buffer:
        global_params[INT_BUFFER] = torch.tensor(100, dtype=torch.int64)
        steps = torch.randint(1, 20, (num_clients,), generator=g, dtype=torch.int64)
        stacked[INT_BUFFER] = -steps if relative else 100 + steps  # updates are w_start - w_end
    coefficients = None
    if relative:
        c = torch.rand(num_clients, generator=g, dtype=torch.float64) + 0.5
        coefficients = c / c.sum()
    batch = UpdateBatch(
        params=stacked,
        num_examples=torch.randint(5, 50, (num_clients,), generator=g),
        client_ids=torch.randperm(100, generator=g)[:num_clients],
        staleness=torch.zeros(num_clients, dtype=torch.int64),
        metrics=[{"train_loss": float(1.0 + i)} for i in range(num_clients)],
        coefficients=coefficients,
        relative=relative,
    )
    return global_params, batch


def _with(batch: UpdateBatch, **changes: Any) -> UpdateBatch:
    return dataclasses.replace(batch, **changes)


def _permute(batch: UpdateBatch, order: Tensor) -> UpdateBatch:
    rows = order.tolist()
    return _with(
        batch,
        params={k: v[order] for k, v in batch.params.items()},
        num_examples=batch.num_examples[order],
        client_ids=batch.client_ids[order],
        staleness=batch.staleness[order],
        metrics=[batch.metrics[i] for i in rows],
        extras={k: (v[order] if isinstance(v, Tensor) else [v[i] for i in rows]) for k, v in batch.extras.items()},
        coefficients=None if batch.coefficients is None else batch.coefficients[order],
    )


def _first(batch: UpdateBatch, m: int) -> UpdateBatch:
    """The first `m` clients; coefficients renormalised to sum to one again."""
    c = batch.coefficients
    return _with(
        batch,
        params={k: v[:m] for k, v in batch.params.items()}, num_examples=batch.num_examples[:m],
        client_ids=batch.client_ids[:m], staleness=batch.staleness[:m], metrics=batch.metrics[:m],
        extras={}, coefficients=None if c is None else c[:m] / c[:m].sum(),
    )


def _all_send(batch: UpdateBatch, params: Params) -> UpdateBatch:
    """The same cohort, every client sending `params`."""
    n = len(batch)
    return _with(batch, params={k: v.unsqueeze(0).expand(n, *v.shape).clone() for k, v in params.items()})


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


class _RuleChecks:
    """The properties of one rule on one kind of batch (models or updates), each checked on a
    fresh clone of the rule, so that what one check teaches a stateful rule cannot make another
    pass or fail."""

    def __init__(self, rule: Aggregator, tags: dict[str, Any], n: int, atol: float, *, relative: bool):
        self.rule = rule
        self.name = rule_name(rule)
        self.tags = tags
        self.n = n
        self.atol = atol
        self.relative = relative
        self.kind = " (updates)" if relative else ""  # messages about models read as before
        self.g, self.batch = self.example(0)

    def example(self, seed: int) -> tuple[Params, UpdateBatch]:
        return example_batch(self.n, seed, int_buffer=True, relative=self.relative)

    def fail(self, prop: str, detail: str, key: str | None = None) -> NoReturn:
        _fail(self.name, prop + self.kind, detail, key)

    def fresh(self) -> Aggregator:
        return _clone(self.rule)

    def call(self, rule: Aggregator, g: Params, batch: UpdateBatch, round: int, prop: str) -> Params:
        """The rule's output on copies of the inputs, which must come back unchanged: every call
        checks that the rule does not write into what it was given (the engine reuses it)."""
        given_g, given = copy.deepcopy(g), copy.deepcopy(batch)
        try:
            out = rule(given_g, given, round=round)
        except Exception as exc:  # the rule's own bug, reported as the property it broke
            self.fail(prop, f"raised {type(exc).__name__}: {exc} (cohort of {len(batch)}, round {round})")
        self.unchanged(g, batch, given_g, given)
        if not isinstance(out, Mapping):
            self.fail(prop, f"returned a {type(out).__name__}, expected a dict of tensors")
        return dict(out)

    def unchanged(self, g: Params, batch: UpdateBatch, given_g: Params, given: UpdateBatch) -> None:
        prop = "inputs not mutated"
        for key, t in g.items():
            if key not in given_g or not torch.equal(given_g[key], t):
                self.fail(prop, "the global params were changed in place", key)
        for key, t in batch.params.items():
            if key not in given.params or not torch.equal(given.params[key], t):
                self.fail(prop, "the batch's stacked params were changed in place", key)
        for field in ("num_examples", "client_ids", "staleness", "coefficients"):
            if _first_difference(getattr(given, field), getattr(batch, field)) is not None:
                self.fail(prop, f"batch.{field} was changed in place")
        if given.metrics != batch.metrics or _first_difference(given.extras, batch.extras) is not None:
            self.fail(prop, "batch.metrics or batch.extras was changed")

    def valid(self, out: Params, g: Params, context: str = "") -> None:
        """The keys the engine's `combine` asks for (every stacked parameter, nothing unknown),
        their shapes and dtypes, integer buffers still integers, finite."""
        missing = [k for k in self.batch.params if k in g and k not in out]
        if missing:
            self.fail(f"keys{context}", "missing from the output (every stacked parameter must come back)", missing[0])
        extra = [k for k in out if k not in g and k not in self.batch.params]
        if extra:
            self.fail(f"keys{context}", "in the output but neither a global nor a stacked parameter", extra[0])
        for key, value in out.items():
            ref = g.get(key)
            if ref is None:
                ref = self.batch.params[key][0]
            if not isinstance(value, Tensor):
                self.fail(f"keys{context}", f"is a {type(value).__name__}, expected a tensor", key)
            if tuple(value.shape) != tuple(ref.shape):
                self.fail(f"shapes{context}", f"shape {tuple(value.shape)}, expected {tuple(ref.shape)}", key)
            if value.dtype != ref.dtype:
                prop = "integer buffers" if not ref.is_floating_point() else "dtypes"
                self.fail(f"{prop}{context}", f"dtype {value.dtype}, expected {ref.dtype}", key)
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                self.fail(f"finite{context}", "non-finite values from finite inputs", key)

    def close(self, prop: str, a: Params, b: Params, detail: str, *, floats_only: bool = False, exact: bool = False) -> None:
        for key, x in a.items():
            y = b[key]
            if not x.is_floating_point():
                if floats_only:
                    continue
                same = torch.equal(x, y)
            elif exact:
                same = torch.equal(x, y)
            else:
                same = torch.allclose(x, y, atol=self.atol, rtol=1e-5)
            if not same:
                diff = f" (max |difference| {_max_diff(x, y):.3g})" if x.is_floating_point() else ""
                self.fail(prop, detail + diff, key)

    # --- the checks, in the order they run ------------------------------------------------

    def output(self) -> None:
        g = {k: v for k, v in self.g.items() if k != INT_BUFFER}
        batch = _with(self.batch, params={k: v for k, v in self.batch.params.items() if k != INT_BUFFER})
        self.valid(self.call(self.fresh(), g, batch, 1, "output"), g)

    def integer_buffers(self) -> None:
        self.valid(self.call(self.fresh(), self.g, self.batch, 1, "integer buffers"), self.g)

    def _rounds(self) -> list[tuple[int, UpdateBatch]]:
        """A few rounds of different cohorts: what a stateful rule sees in a run."""
        return [(r, self.example(r)[1]) for r in (1, 2, 3)]

    def deterministic(self) -> None:
        a, b = self.fresh(), self.fresh()
        for r, batch in self._rounds():
            x = self.call(a, self.g, batch, r, "deterministic")
            y = self.call(b, self.g, batch, r, "deterministic")
            self.valid(x, self.g)
            self.close("deterministic", x, y, f"two fresh copies given the same calls differ at round {r}", exact=True)
        if not self.tags["stateful"]:
            rule = self.fresh()
            first = self.call(rule, self.g, self.batch, 1, "deterministic")
            again = self.call(rule, self.g, self.batch, 1, "deterministic")
            self.close("deterministic", first, again, "a second call on the same input gave another result "
                       "(a rule that learns across rounds declares tags = {'stateful': True})", exact=True)

    def client_order(self) -> None:
        out = self.call(self.fresh(), self.g, self.batch, 1, "client order")
        n = len(self.batch)
        for order in (torch.arange(n).roll(1), torch.arange(n).flip(0)):
            shuffled = self.call(self.fresh(), self.g, _permute(self.batch, order), 1, "client order")
            self.close("client order", out, shuffled, "result depends on client order", floats_only=True)

    def _identity(self, batch: UpdateBatch, context: str) -> None:
        """Clients that agree on x get x (a server optimiser moves from the centre toward it);
        clients that all send the centre (the global model, or a zero update) leave it as it is."""
        prop = f"identity{context}"
        center = batch.center(self.g)
        x = {k: v[0] for k, v in batch.params.items()}
        out = self.call(self.fresh(), self.g, _all_send(batch, x), 1, prop)
        self.valid(out, self.g, context)
        if self.tags["server_optimizer"]:
            for key, value in out.items():
                if value.is_floating_point():
                    toward = float(((value - center[key]).double() * (x[key] - center[key]).double()).sum())
                    if not toward > 0:
                        self.fail(prop, "every client sent the same tensor, but the output does not move "
                                  "toward it", key)
                elif not torch.equal(value, x[key]):
                    self.fail(prop, "every client sent the same counter, but the output holds another", key)
        else:
            self.close(prop, out, x, "every client sent the same tensor, but the output differs from it")
        what = "a zero update" if batch.relative else "the global params back"
        back = self.call(self.fresh(), self.g, _all_send(batch, center), 1, prop)
        self.close(prop, back, center, f"every client sent {what}, but the output moved away from it")

    def identity(self) -> None:
        self._identity(self.batch, "")

    def cohort_size(self) -> None:
        for m in range(self.tags["min_clients"], self.n + 1):
            context = f" (cohort of {m})"
            batch = _first(self.batch, m)
            self.valid(self.call(self.fresh(), self.g, batch, 1, f"cohort size{context}"), self.g, context)
            self._identity(batch, context)

    def round_and_staleness(self) -> None:
        rule = self.fresh()
        gen = torch.Generator().manual_seed(7)
        for r in (1, 2, 10, 1000):
            batch = _with(self.example(r)[1], staleness=torch.randint(0, 10, (self.n,), generator=gen, dtype=torch.int64))
            context = f" (round {r}, staleness {batch.staleness.tolist()})"
            self.valid(self.call(rule, self.g, batch, r, f"round and staleness{context}"), self.g, context)

    def weights(self) -> None:
        """Weights are example counts unless the merge point sets coefficients. Only relative counts
        may matter; coefficients are the merge's own (their sum can carry a step size), so only a
        rule that declares it ignores weights is held to anything about them."""
        out = self.call(self.fresh(), self.g, self.batch, 1, "weights")
        gen = torch.Generator().manual_seed(11)
        if not self.tags["uses_weights"]:
            other = self.batch.coefficients
            if other is not None:  # other proportions, the same sum (the sum may carry a step size)
                c = torch.rand(self.n, generator=gen, dtype=torch.float64) + 0.1
                other = c / c.sum() * other.sum()
            changed = _with(self.batch, num_examples=torch.randint(1, 1000, (self.n,), generator=gen), coefficients=other)
            self.close("weights", out, self.call(self.fresh(), self.g, changed, 1, "weights"),
                       "the output depends on the weights, but the rule declares tags = {'uses_weights': False}")
        elif self.batch.coefficients is None:
            scaled = _with(self.batch, num_examples=self.batch.num_examples * 7)
            self.close("weights", out, self.call(self.fresh(), self.g, scaled, 1, "weights"),
                       "multiplying every client's num_examples by 7 changed the output (only relative weights may matter)")

    def state(self) -> None:
        """Settings stay put and what the rule learns survives a checkpoint: the engine saves only
        attributes ending in `_`, so state kept elsewhere is lost on resume."""
        rounds = self._rounds()
        a = self.fresh()
        settings = {k: copy.deepcopy(v) for k, v in _attributes(a).items() if not k.endswith("_") and _is_data(v)}
        outs = [self.call(a, self.g, batch, r, "state") for r, batch in rounds]
        for k, v in settings.items():
            if _first_difference(v, _attributes(a).get(k, _MISSING)) is not None:
                self.fail("state", f"attribute {k!r} changed while aggregating: settings stay fixed and state "
                          "learnt across rounds lives in attributes ending in '_' (checkpoints keep only those)")
        b = self.fresh()
        for r, batch in rounds[:-1]:
            self.call(b, self.g, batch, r, "state")
        try:
            buf = io.BytesIO()
            torch.save(checkpoint.encode(_rule_state(b)), buf)
            buf.seek(0)
            saved = checkpoint.decode(torch.load(buf, weights_only=True))
        except Exception as exc:
            self.fail("state", f"cannot be checkpointed: {type(exc).__name__}: {exc}")
        c = self.fresh()
        for k, v in saved.items():
            setattr(c, k, v)
        r, batch = rounds[-1]
        resumed = self.call(c, self.g, batch, r, "state")
        self.close("state", outs[-1], resumed, f"a fresh copy given the state saved after round {r - 1} answers "
                   f"round {r} differently (checkpoints keep only attributes ending in '_'; resumed runs would differ)",
                   exact=True)


_MISSING = object()


def _fail(name: str, prop: str, detail: str, key: str | None = None) -> NoReturn:
    where = f" key {key!r}:" if key is not None else ""
    raise AssertionError(_one_line(f"{name}: {prop}:{where} {detail}"))


def _attributes(obj: Any) -> dict[str, Any]:
    return dict(getattr(obj, "__dict__", {}))


def _clone(rule: Aggregator) -> Aggregator:
    """scikit-learn's `clone`: the same settings, nothing learnt (attributes ending in `_` go)."""
    rule = copy.deepcopy(rule)
    for k in [k for k in _attributes(rule) if k.endswith("_")]:
        delattr(rule, k)
    return rule


def _rule_state(rule: Any) -> dict[str, Any]:
    """What a checkpoint keeps of a rule: its attributes ending in `_`, as `ServerRounds` saves them."""
    return {k: v for k, v in _attributes(rule).items() if k.endswith("_")}


def _rule_tags(rule: Aggregator) -> dict[str, Any]:
    name = rule_name(rule)
    declared = getattr(rule, "tags", None) or {}
    if not isinstance(declared, Mapping):
        _fail(name, "tags", f"expected a dict of tags, got {type(declared).__name__}")
    for tag, value in declared.items():
        if tag not in TAGS:
            _fail(name, "tags", f"unknown tag {tag!r} (known: {', '.join(TAGS)})")
        if tag == "min_clients":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, "tags", f"min_clients must be an integer >= 1, got {value!r}")
        elif not isinstance(value, bool):
            _fail(name, "tags", f"{tag} must be true or false, got {value!r}")
    tags = {**TAGS, **declared}
    if "min_clients" not in declared and hasattr(rule, "min_clients"):  # the attribute rules also carry
        tags["min_clients"] = getattr(rule, "min_clients")
        if not isinstance(tags["min_clients"], int) or isinstance(tags["min_clients"], bool) or tags["min_clients"] < 1:
            _fail(name, "tags", f"min_clients must be an integer >= 1, got {tags['min_clients']!r}")
    return tags


def check_aggregator(rule: Aggregator, *, num_clients: int = 6, atol: float = 1e-6) -> None:
    """Raise AssertionError, in one line naming the rule, the property and the key, at the first
    property `rule` breaks. Each check calls a fresh clone of `rule` (a deep copy without the
    attributes ending in `_`, so nothing learnt reaches the next check); `rule` is left as given.

    Every check runs twice: on client models (`batch.relative = False`, weighted by example
    counts, as server rounds, graphs, gossip and MoDeST merge) and on client updates
    (`relative = True`, with coefficients, as event-driven servers merge; messages say
    "(updates)"). The rule returns a tensor of the batch's kind: nothing assumes the output lies
    near the global parameters.

    Properties, in order: known, well-typed `tags` (see `TAGS`); output with the keys `combine`
    asks for (every stacked parameter), their shapes and dtypes, finite; integer buffers (an int64
    counter) come back as integers without crashing the rule; the inputs are not changed in place
    (on every call); deterministic (two fresh clones given the same calls agree; a rule not tagged
    stateful also gives the same answer twice); independent of client order (floating tensors; any
    client's counter will do); identity (clients that all send x get x, or a move toward x from a
    `server_optimizer`; clients that all send the centre, the global params or a zero update, leave
    it unchanged); every cohort size from `min_clients` to `num_clients`; rounds up to 1000 with
    random staleness; weights (only relative example counts matter; neither counts nor the
    proportions of coefficients if `uses_weights` is false); state (settings unchanged by calls;
    the `_` attributes saved after round 2, through a checkpoint, give a fresh clone the same
    round 3).
    """
    tags = _rule_tags(rule)
    n = max(num_clients, tags["min_clients"], 2)
    for relative in (False, True):
        checks = _RuleChecks(rule, tags, n, atol, relative=relative)
        for check in (checks.output, checks.integer_buffers, checks.deterministic, checks.client_order,
                      checks.identity, checks.cohort_size, checks.round_and_staleness, checks.weights, checks.state):
            check()


# ---------------------------------------------------------------------------------------------
# flows


def check_flow(
    build: Callable[..., Any] | str,
    scenario: str | Path | Mapping[str, Any],
    *,
    rounds: int = 3,
    resume_from: int | None = None,
    options: Any = None,
) -> None:
    """Run `rounds` rounds with a checkpoint after every evaluation, resume from a mid-run
    checkpoint (`resume_from`, default the middle one) as a new process would, and raise
    AssertionError naming the flow and the first difference: a metrics.csv row and column
    (wall_time aside), or an entry of the flow's declared state or the context's (clock, ledger,
    busy time) after the last round. A flow without declared state fails when it is built.

    `build` is a build function `(config, ctx) -> flow` or a registered algorithm's name;
    `scenario` a path, TOML text or a dict (one run: no [sweep]). Runs go to a temporary folder,
    inline unless `options` (a `RunOptions`) says otherwise. Global random generators are reseeded
    differently before the resume, so a flow that draws from them is caught, and restored after.
    """
    from .coordinator import RunOptions, run
    from .registry import algorithms
    from .scenario import AlgorithmSpec, algorithm_spec, read_toml, validate

    if rounds < 2:
        raise ValueError(f"check_flow needs at least 2 rounds to resume mid-run, got rounds = {rounds}")
    if resume_from is not None and not 1 <= resume_from < rounds:
        raise ValueError(f"resume_from = {resume_from}: expected a round from 1 to {rounds - 1}")
    name = build if isinstance(build, str) else getattr(build, "__name__", repr(build))
    algorithm = algorithm_spec(algorithms.get(build) if isinstance(build, str) else build)
    raw, source = _scenario_dict(scenario)
    if "sweep" in raw:
        raise ValueError("check_flow checks one run: remove the [sweep] table")
    raw["rounds"] = rounds
    raw["checkpoint_every"] = 1
    options = options or RunOptions(executor="inline", progress=False)
    built: list[Any] = []

    def checked_build(cfg: Any, ctx: Any) -> Any:
        flow = algorithm.build(cfg, ctx)
        try:
            checkpoint.require_state(flow, name)
        except FedsimError as exc:
            raise AssertionError(_one_line(f"{name}: declared state: {exc.message}")) from None
        built.append(flow)
        return flow

    spec_algorithm = AlgorithmSpec(checked_build, algorithm.config, algorithm.needs_topology)
    spec = validate(raw, source, {}, algorithm=spec_algorithm)
    with tempfile.TemporaryDirectory(prefix="fedsim-check-flow-") as tmp, _global_rngs_kept():
        root = Path(tmp)
        whole, cut = root / "whole", root / "resumed"
        _seed_global_rngs(1)
        at_checkpoint: dict[int, dict[str, Any]] = {}  # the uninterrupted flow's undeclared data, by round
        with _coordinator_hooks(root / "kept-whole", on_save=lambda r: at_checkpoint.update(
                {r: copy.deepcopy(_undeclared_data(built[-1]))})) as kept_whole:
            run(spec, options=options, run_dir=whole)
        if not kept_whole:
            raise AssertionError(f"{name}: the run wrote no checkpoint, although checkpoint_every = 1")
        last = max(kept_whole)
        middle = sorted(r for r in kept_whole if r != last)
        if not middle:
            raise ValueError(f"check_flow needs an evaluation before the last one: {rounds} round(s) with "
                             f"eval_every = {spec.scenario.eval_every} gave checkpoints at rounds {sorted(kept_whole)}")
        j = middle[(len(middle) - 1) // 2] if resume_from is None else resume_from
        if j not in middle:
            raise ValueError(f"resume_from = {j}: the run checkpointed at rounds {middle} before its last ({last})")
        # The folder a run killed after round j leaves: its scenario, every row written (those after
        # the checkpoint are dropped on resume) and the checkpoint of round j.
        cut.mkdir()
        for file in ("scenario.toml", "metrics.csv"):
            shutil.copyfile(whole / file, cut / file)
        shutil.copyfile(kept_whole[j], cut / "checkpoint.pt")
        resolved = validate(read_toml(cut / "scenario.toml"), str(cut / "scenario.toml"), {}, algorithm=spec_algorithm)
        _seed_global_rngs(2)
        restored: dict[str, Any] = {}
        with _coordinator_hooks(root / "kept-resumed", on_restore=lambda flow: restored.update(
                copy.deepcopy(_undeclared_data(flow)))) as kept_resumed:
            run(resolved, options=options, run_dir=cut, resume=True)
        # What the checkpoint did not bring back: data the flow does not declare that differs, right
        # after the resume, from the uninterrupted flow at the same point. The likely culprits.
        before = at_checkpoint[j]
        suspects = [k for k in before if _first_difference(before[k], restored.get(k, _MISSING)) is not None]
        hint = (f"; not restored (not in the flow's declared state, different right after the resume): "
                f"{', '.join(map(repr, suspects))}") if suspects else ""
        where = f"{name}: resumed from the checkpoint of round {j}"
        _compare_curves(whole / "metrics.csv", cut / "metrics.csv", where, hint)
        if last not in kept_resumed:
            raise AssertionError(f"{where}: the resumed run made no checkpoint at round {last}{hint}")
        a, b = checkpoint.load(kept_whole[last]), checkpoint.load(kept_resumed[last])
        for part, x, y in (("flow", _state_tree(a["flow"]), _state_tree(b["flow"])),
                           ("ctx", _Attributes(checkpoint.decode(a["ctx"])), _Attributes(checkpoint.decode(b["ctx"])))):
            diff = _first_difference(x, y, part)
            if diff is not None:
                raise AssertionError(_one_line(f"{where}: after round {last} the state differs at {diff}{hint}"))


def _scenario_dict(scenario: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(scenario, Mapping):
        return copy.deepcopy(dict(scenario)), "<check_flow scenario>"
    if isinstance(scenario, str) and ("\n" in scenario or ("=" in scenario and not Path(scenario).is_file())):
        return tomllib.loads(scenario), "<check_flow scenario>"  # TOML text, not a path
    from .scenario import read_toml

    return read_toml(scenario), str(scenario)


@contextlib.contextmanager
def _coordinator_hooks(
    folder: Path, *, on_save: Callable[[int], None] | None = None, on_restore: Callable[[Any], None] | None = None,
) -> Iterator[dict[int, Path]]:
    """For one run: keep a copy of every checkpoint by round (the coordinator overwrites
    checkpoint.pt and deletes it at the end), call `on_save(round)` after each and
    `on_restore(flow)` once a resumed flow holds its saved state, and skip convergence.png (most of
    a small run's time, and not compared). Until `run` offers these hooks, `checkpoint.save`,
    `checkpoint.restore` and the coordinator's `plot_run` are wrapped, and put back afterwards.
    """
    from . import coordinator

    folder.mkdir(parents=True)
    kept: dict[int, Path] = {}
    save, restore, plot = checkpoint.save, checkpoint.restore, getattr(coordinator, "plot_run", None)

    def saving(path: Path, payload: dict[str, Any], **options: Any) -> None:
        save(path, payload, **options)
        r = int(payload["round"])
        kept[r] = folder / f"round-{r}.pt"
        shutil.copyfile(path, kept[r])
        if on_save is not None:
            on_save(r)

    def restoring(obj: Any, state: dict[str, Any]) -> None:
        restore(obj, state)
        if on_restore is not None:
            on_restore(obj)

    checkpoint.save, checkpoint.restore = saving, restoring  # type: ignore[assignment]
    if plot is not None:
        coordinator.plot_run = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    try:
        yield kept
    finally:
        checkpoint.save, checkpoint.restore = save, restore  # type: ignore[assignment]
        if plot is not None:
            coordinator.plot_run = plot  # type: ignore[attr-defined]


@contextlib.contextmanager
def _global_rngs_kept() -> Iterator[None]:
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def _seed_global_rngs(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _compare_curves(whole: Path, resumed: Path, where: str, hint: str) -> None:
    a, b = _csv_rows(whole), _csv_rows(resumed)
    columns = [c for c in dict.fromkeys([*a[0], *b[0]]) if c != "wall_time"] if a and b else []
    for i, (x, y) in enumerate(zip(a, b)):
        for col in columns:
            if x.get(col) != y.get(col):
                raise AssertionError(_one_line(
                    f"{where}: metrics.csv row {i} (round {x.get('round')}), column {col}: "
                    f"{x.get(col)!r} uninterrupted, {y.get(col)!r} resumed{hint}"))
    if len(a) != len(b):
        raise AssertionError(f"{where}: metrics.csv has {len(a)} rows uninterrupted, {len(b)} resumed{hint}")


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


class _Attributes(dict):
    """Declared attributes by name, shown as `flow.name` in messages."""


def _state_tree(captured: dict[str, Any]) -> Any:
    """A checkpoint's flow part, decoded, nested parts as attributes."""
    if "__state_dict__" in captured:
        return checkpoint.decode(captured["__state_dict__"])
    return _Attributes({k: _state_tree(v["__nested__"]) if isinstance(v, dict) and "__nested__" in v
                        else checkpoint.decode(v) for k, v in captured.items()})


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two values differ, as an access path (`flow.params['fc.weight']`), or None.

    Bit-exact: resumed runs promise identical numbers. NaN equals NaN here."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape or a.dtype != b.dtype:
            return path
        a, b = (t.to_dense() if t.is_sparse else t for t in (a, b))
        same = (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b
        return None if bool(same.all()) else path
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or a.shape != b.shape or a.dtype != b.dtype:
            return path
        return None if np.array_equal(a, b, equal_nan=a.dtype.kind in "fc") else path
    if isinstance(a, _Attributes) and isinstance(b, _Attributes):
        return _first_field_difference(a, b, lambda k: f"{path}.{k}")
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return _first_field_difference(a, b, lambda k: f"{path}[{k!r}]")
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return path
        for i, (x, y) in enumerate(zip(a, b)):
            diff = _first_difference(x, y, f"{path}[{i}]")
            if diff is not None:
                return diff
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    if _is_plain(a) and _is_plain(b):
        return None if type(a) is type(b) and a == b else path
    if type(a) is type(b) and _is_record(a):  # checkpointable objects: dataclasses, slots, plain classes
        return _first_field_difference(checkpoint._fields(a), checkpoint._fields(b), lambda k: f"{path}.{k}")
    try:
        return None if bool(a == b) else path
    except Exception:
        return path


def _first_field_difference(a: Mapping[Any, Any], b: Mapping[Any, Any], at: Callable[[Any], str]) -> str | None:
    for k in a:
        if k not in b:
            return at(k)
        diff = _first_difference(a[k], b[k], at(k))
        if diff is not None:
            return diff
    extra = [k for k in b if k not in a]
    return at(extra[0]) if extra else None


def _is_record(x: Any) -> bool:
    """An object a checkpoint may hold, compared field by field: a registered class or a dataclass."""
    cls = type(x)
    return f"{cls.__module__}.{cls.__qualname__}" in checkpoint._TYPES or (
        dataclasses.is_dataclass(x) and not isinstance(x, type))


def _is_plain(x: Any) -> bool:
    return x is None or isinstance(x, (bool, int, float, str, np.generic))


def _is_data(x: Any, depth: int = 0) -> bool:
    """Numbers, tensors, arrays and containers of them: what a flow's state is made of."""
    if depth > 6:
        return False
    if _is_plain(x) or isinstance(x, (Tensor, np.ndarray)):
        return True
    if isinstance(x, Mapping):
        return all(_is_plain(k) or isinstance(k, tuple) for k in x) and all(_is_data(v, depth + 1) for v in x.values())
    if isinstance(x, (list, tuple, set)):
        return all(_is_data(v, depth + 1) for v in x)
    if _is_record(x):
        return all(_is_data(v, depth + 1) for v in checkpoint._fields(x).values())
    return False


def _undeclared_data(flow: Any) -> dict[str, Any]:
    """The flow's attributes that hold data (numbers, tensors, arrays, records and containers of
    them, or parts that declare their own state) but are not in its declared state."""
    if hasattr(flow, "STATE"):
        declared = set(flow.STATE)
    elif callable(getattr(flow, "state_dict", None)):
        declared = set(flow.state_dict())
    else:
        declared = set()
    out = {}
    for k, v in _attributes(flow).items():
        if k in declared:
            continue
        if hasattr(v, "STATE") or checkpoint._has_state_methods(v):  # a part with its own declaration
            try:
                out[k] = _state_tree(checkpoint.capture(v))
            except Exception:  # a part that cannot be saved is not one a checkpoint could have kept
                continue
        elif _is_data(v):
            out[k] = v
    return out
