"""Server optimisers: how the server steps once a rule has combined the clients' models.

FedOpt (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 1) splits a round
into ClientOpt and ServerOpt: the server treats the combined update as a pseudo-gradient and steps
with SGD, momentum (FedAvgM), Adagrad, Adam or Yogi. Keeping this apart from aggregation rules lets
any rule (mean, median, Krum) feed any optimiser ("median then Adam"), and makes FedBuff's server
learning rate and FedAdam's state the same knob.

Sign convention, the paper's (Algorithm 2, Delta_t = mean_i (x_i - x_t)): the pseudo-gradient is
the *update direction* Delta = combined - global_params, and every optimiser moves along it,
x <- x + lr * (its direction). Equivalently the optimiser descends on the gradient -Delta.

Each class implements `fedsim.ServerOptimizer` (what `RunContext.server_step` calls after a rule).
State learnt across rounds lives in attributes ending with `_` (the rules' convention), as
`dict[str, Tensor]`, and is listed in `STATE` so that `fedsim.checkpoint.capture` saves it as plain
tensors that `torch.load(weights_only=True)` reads. Non-floating tensors (BatchNorm's
`num_batches_tracked`) are counters, not coordinates: they pass through from `combined`. So does a
tensor that *is* the global one (the same object: a frozen weight the rule never produced, as
`ServerRounds` merges `{**global, **combined}`), without moments: a frozen MiniLM body would
otherwise cost two model copies of zeros.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Literal, Mapping

import torch
from pydantic import Field, model_validator
from torch import Tensor

from .aggregation import ServerOptimizer
from .params import Params
from .scenario import Section


def _check_names(global_params: Mapping[str, Tensor], combined: Mapping[str, Tensor], who: str) -> None:
    if global_params.keys() != combined.keys():
        missing = sorted(global_params.keys() - combined.keys())
        extra = sorted(combined.keys() - global_params.keys())
        raise ValueError(f"{who}: the combined model must have the global model's tensors; missing {missing}, unexpected {extra}")


class _Stateful:
    """`state_dict()` / `load_state_dict()` over the attributes named in `STATE`."""

    STATE: ClassVar[tuple[str, ...]] = ()

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {name: dict(getattr(self, name)) for name in self.STATE}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        unknown = set(state) - set(self.STATE)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown state {sorted(unknown)}; expected {list(self.STATE)}")
        for name in self.STATE:
            setattr(self, name, dict(state.get(name, {})))

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.endswith("_"))
        return f"{type(self).__name__}({settings})"


class ServerSGD(_Stateful):
    """x <- x + lr * b with b <- momentum * b + Delta (heavy ball; b starts at 0).

    lr = 1, momentum = 0 is FedAvg: the combined model itself is returned, untouched, so that runs
    without a server optimiser keep their curves bit for bit (x + (c - x) is not c in floating
    point). momentum > 0 is FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data
    Distribution", Section 3: v <- beta v + Delta w, w <- w - v, with their Delta w = -Delta);
    lr != 1 is SCAFFOLD's global step size eta_g (Karimireddy et al., ICML 2020, Algorithm 1).
    """

    STATE = ("momentum_buffer_",)

    def __init__(self, lr: float = 1.0, momentum: float = 0.0):
        self.lr = lr
        self.momentum = momentum
        self.momentum_buffer_: dict[str, Tensor] = {}

    def step(self, global_params: Params, combined: Params, *, round: int) -> Params:
        _check_names(global_params, combined, type(self).__name__)
        if self.lr == 1.0 and self.momentum == 0.0:
            return combined
        out = {}
        for name, x in global_params.items():
            if not x.is_floating_point() or combined[name] is x:
                out[name] = combined[name]
                continue
            direction = combined[name] - x
            if self.momentum:
                previous = self.momentum_buffer_.get(name)
                direction = direction if previous is None else self.momentum * previous + direction
                self.momentum_buffer_[name] = direction
            out[name] = x + self.lr * direction
        return out


class _Adaptive(_Stateful):
    """Reddi et al. 2021, Algorithm 2, shared by FedAdagrad, FedYogi and FedAdam:

        m_t = beta1 m_{t-1} + (1 - beta1) Delta_t          (m_{-1} = 0)
        v_t = <the optimiser's second-moment rule>         (v_{-1} = tau^2)
        x_{t+1} = x_t + lr * m_t / (sqrt(v_t) + tau)

    As in Algorithm 2 there is no bias correction (Flower's strategies add one; the paper's code
    uses Keras optimisers that do). v starts at tau^2, the smallest value the algorithm's input
    `v_{-1} >= tau^2` allows (Flower starts at 0); tau bounds the adaptivity either way.
    """

    STATE = ("m_", "v_")

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float):
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self.m_: dict[str, Tensor] = {}
        self.v_: dict[str, Tensor] = {}

    def _second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        raise NotImplementedError

    def step(self, global_params: Params, combined: Params, *, round: int) -> Params:
        _check_names(global_params, combined, type(self).__name__)
        out = {}
        for name, x in global_params.items():
            if not x.is_floating_point() or combined[name] is x:
                out[name] = combined[name]
                continue
            delta = combined[name] - x
            m = self.m_.get(name, torch.zeros_like(x))
            v = self.v_.get(name, torch.full_like(x, self.tau**2))
            m = self.beta1 * m + (1 - self.beta1) * delta
            v = self._second_moment(v, delta)
            self.m_[name], self.v_[name] = m, v
            out[name] = x + self.lr * m / (v.sqrt() + self.tau)
        return out


class FedAdam(_Adaptive):
    """v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2 (Reddi et al. 2021, Algorithm 2, FedAdam).
    Defaults beta1 = 0.9, beta2 = 0.99 and tau = 1e-3 are the paper's (Section 5)."""

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        super().__init__(lr, beta1, beta2, tau)

    def _second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta**2


class FedYogi(_Adaptive):
    """v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2) (Algorithm 2, FedYogi;
    Zaheer et al. 2018): v moves towards Delta^2 by an additive step, so it grows no faster than
    Adam's but does not forget a large past update as quickly."""

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        super().__init__(lr, beta1, beta2, tau)

    def _second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        d2 = delta**2
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)


class FedAdagrad(_Adaptive):
    """v_t = v_{t-1} + Delta_t^2 (Algorithm 2, FedAdagrad). beta1 defaults to 0 (no server
    momentum): Adagrad has none, the paper's code uses Keras' plain Adagrad and Flower's FedAdagrad
    fixes beta1 = 0; Algorithm 2 allows any beta1, so it stays a setting. beta2 is unused."""

    def __init__(self, lr: float, beta1: float = 0.0, tau: float = 1e-3):
        super().__init__(lr, beta1, 0.0, tau)

    def _second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        return v + delta**2


_OPTIMIZERS: dict[str, type] = {"sgd": ServerSGD, "adam": FedAdam, "yogi": FedYogi, "adagrad": FedAdagrad}


def _settings(cls: type) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def build_server_optimizer(name: str, **options: Any) -> ServerOptimizer:
    """A server optimiser by name ("sgd", "adam", "yogi", "adagrad") with its settings.

    Unknown names and settings the optimiser does not take are one-line `ValueError`s naming what
    was expected, never a silently ignored key."""
    cls = _OPTIMIZERS.get(name)
    if cls is None:
        raise ValueError(f"unknown server optimizer {name!r}; expected one of {', '.join(sorted(_OPTIMIZERS))}")
    accepted = _settings(cls)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"server optimizer {name!r} takes {', '.join(accepted)}; got {', '.join(unknown)}")
    if "lr" not in options and cls is not ServerSGD:
        raise ValueError(f"server optimizer {name!r} needs lr (the server learning rate)")
    return cls(**options)


class ServerOptConfig(Section):
    """A server optimiser's scenario table: `name` plus the settings that optimiser takes.

    Settings left out take the optimiser's own defaults (Adam and Yogi: beta1 = 0.9, beta2 = 0.99,
    tau = 1e-3; Adagrad: beta1 = 0); a setting the named optimiser does not use is an error rather
    than silently ignored. lr defaults to 1, which with sgd and momentum 0 is plain FedAvg.
    """

    name: Literal["sgd", "adam", "yogi", "adagrad"] = "sgd"
    lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    beta1: float | None = Field(None, ge=0, lt=1)
    beta2: float | None = Field(None, ge=0, lt=1)
    tau: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _applies(self) -> "ServerOptConfig":
        accepted = set(_settings(_OPTIMIZERS[self.name]))
        unused = sorted(k for k in self.model_fields_set - {"name"} if k not in accepted)
        if unused:
            raise ValueError(f"{', '.join(unused)} does not apply to server optimizer {self.name!r} (it takes {', '.join(sorted(accepted))})")
        return self

    def build(self) -> ServerOptimizer:
        accepted = _settings(_OPTIMIZERS[self.name])
        options = {k: getattr(self, k) for k in accepted if getattr(self, k) is not None}
        return build_server_optimizer(self.name, **options)
