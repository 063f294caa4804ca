"""Optimisers (SGD, momentum, Nesterov, Adam) with L2 weight decay, and learning-rate schedules.

Optimisers update parameters in place from the gradients a ``Workspace`` leaves behind. SGD asks for
gradients already multiplied by the learning rate (``grad_scale``), which saves a pass over every
weight per batch; Adam asks for plain gradients.
"""

from __future__ import annotations

import math

import numpy as np

from shared.scaling import dtype_scalar

OPTIMISERS = ("sgd", "momentum", "nesterov", "adam")
SCHEDULES = ("constant", "step", "cosine")


class SGD:
    """Plain, heavy-ball or Nesterov SGD; the velocity holds lr-scaled gradients."""

    def __init__(
        self,
        params: list[np.ndarray],
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = params
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.velocity = [np.zeros_like(p) for p in params] if momentum else []
        self._scratch = [np.empty_like(p) for p in params] if (weight_decay or nesterov) else []

    def grad_scale(self, lr: float) -> float:
        return lr

    def step(self, grads: list[np.ndarray], lr: float) -> None:
        """Apply one update from ``grads`` (already multiplied by ``lr``)."""
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            if self.weight_decay:
                tmp = self._scratch[i]
                np.multiply(p, dtype_scalar(lr * self.weight_decay, p.dtype), out=tmp)
                g += tmp
            if not self.momentum:
                p -= g
                continue
            v = self.velocity[i]
            v *= dtype_scalar(self.momentum, p.dtype)
            v += g
            if self.nesterov:
                tmp = self._scratch[i]
                np.multiply(v, dtype_scalar(self.momentum, p.dtype), out=tmp)
                tmp += g
                p -= tmp
            else:
                p -= v

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {f"velocity_{i}": v for i, v in enumerate(self.velocity)}

    def param_state(self, i: int) -> list[np.ndarray]:
        """The state arrays shaped like parameter ``i`` (to reorder them along with it)."""
        return [self.velocity[i]] if self.velocity else []

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        for i, v in enumerate(self.velocity):
            v[...] = arrays[f"velocity_{i}"]


class Adam:
    """Adam (Kingma & Ba, in the paper's efficient ordering) with L2 decay added to the gradient."""

    def __init__(
        self,
        params: list[np.ndarray],
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = params
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.weight_decay = weight_decay
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self._scratch = [np.empty_like(p) for p in params]
        self.t = 0

    def grad_scale(self, lr: float) -> float:
        return 1.0

    def step(self, grads: list[np.ndarray], lr: float) -> None:
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        step_size = lr * math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        for p, g, m, v, tmp in zip(self.params, grads, self.m, self.v, self._scratch, strict=True):
            dt = p.dtype
            if self.weight_decay:
                np.multiply(p, dtype_scalar(self.weight_decay, dt), out=tmp)
                g += tmp
            m *= dtype_scalar(b1, dt)
            np.multiply(g, dtype_scalar(1 - b1, dt), out=tmp)
            m += tmp
            v *= dtype_scalar(b2, dt)
            np.multiply(g, g, out=tmp)
            tmp *= dtype_scalar(1 - b2, dt)
            v += tmp
            np.sqrt(v, out=tmp)
            tmp += dtype_scalar(self.eps, dt)
            np.divide(m, tmp, out=tmp)
            tmp *= dtype_scalar(step_size, dt)
            p -= tmp

    def param_state(self, i: int) -> list[np.ndarray]:
        """The state arrays shaped like parameter ``i`` (to reorder them along with it)."""
        return [self.m[i], self.v[i]]

    def state_arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"m_{i}": m for i, m in enumerate(self.m)}
        arrays.update({f"v_{i}": v for i, v in enumerate(self.v)})
        arrays["t"] = np.array(self.t, dtype=np.int64)
        return arrays

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        for i, (m, v) in enumerate(zip(self.m, self.v, strict=True)):
            m[...] = arrays[f"m_{i}"]
            v[...] = arrays[f"v_{i}"]
        self.t = int(arrays["t"])


def make_optimiser(
    name: str,
    params: list[np.ndarray],
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> SGD | Adam:
    """The optimiser called ``name`` (one of ``OPTIMISERS``) over ``params``."""
    if name == "sgd":
        return SGD(params, weight_decay=weight_decay)
    if name == "momentum":
        return SGD(params, momentum=momentum, weight_decay=weight_decay)
    if name == "nesterov":
        return SGD(params, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    if name == "adam":
        return Adam(params, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"optimiser must be one of {OPTIMISERS}, got {name!r}")


def learning_rate(
    schedule: str,
    base_lr: float,
    progress: float,
    *,
    epoch: int = 0,
    step_epochs: int = 10,
    gamma: float = 0.1,
    min_lr: float = 0.0,
    warmup: float = 0.0,
) -> float:
    """Learning rate at ``progress`` (0..1 through training; ``epoch`` for step decay).

    ``warmup`` is the fraction of training spent ramping linearly up from ``base_lr / 10``.
    """
    if schedule == "constant":
        lr = base_lr
    elif schedule == "step":
        lr = base_lr * gamma ** (epoch // step_epochs)
    elif schedule == "cosine":
        lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup and progress < warmup:
        lr = min(lr, base_lr * (0.1 + 0.9 * progress / warmup))
    return lr
