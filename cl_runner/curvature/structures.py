"""The Fisher's representations over named parameter tensors: diagonal, KFAC (per-layer Kronecker
factors, the rest diagonal) and dense (the P × P matrix, or its factor U with F = UᵀU), with the
operations the methods need (quadratic form, matrix-vector product, damped solve, weighted sums,
checkpoint state, a picture). The math of each is in :mod:`cl_runner.curvature.structured`'s
docstring; computing them is :func:`cl_runner.curvature.fisher`'s job."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("diag", "kfac", "dense")
DENSE_LIMIT = 20_000  # parameters: a P×P float32 matrix of 1.6 GB


def flat(d: Mapping[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([d[n].reshape(-1) for n in names])


def unflat(v: Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    out, i = {}, 0
    for n, s in shapes.items():
        k = math.prod(s)
        out[n] = v[i : i + k].reshape(s)
        i += k
    return out


def check_dense(n_params: int, limit: int = DENSE_LIMIT) -> None:
    """One-line refusal when a dense P × P Fisher would not fit."""
    if n_params > limit:
        raise ValueError(
            f"method.fisher=dense: the model has {n_params:,} trainable parameters, more than the dense "
            f"Fisher's limit of {limit:,} (a {n_params:,}² matrix); use method.fisher=kfac or diag"
        )


class Curvature:
    """A Fisher over named parameter tensors (``shapes``: name → shape, named_params order)."""

    kind = ""

    def __init__(self, shapes: Mapping[str, torch.Size]):
        self.shapes = {n: torch.Size(s) for n, s in shapes.items()}

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def quadratic(self, delta: Mapping[str, Tensor]) -> Tensor:
        """δᵀ F δ (differentiable in δ)."""
        return sum((delta[n] * v).sum() for n, v in self.matvec(delta).items())

    def matvec(self, v: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def solve(self, g: Mapping[str, Tensor], damping: float) -> dict[str, Tensor]:
        raise NotImplementedError

    def add_(self, other: Curvature, weight: float = 1.0) -> Curvature:
        raise NotImplementedError

    def scale_(self, weight: float) -> Curvature:
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        raise NotImplementedError

    def diagonal(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def image(self, max_side: int = 1024) -> Tensor:
        """The matrix as a picture (see :func:`picture`)."""
        return picture(self.to_dense(), max_side)


def picture(matrix: Tensor, max_side: int = 1024) -> Tensor:
    """A matrix as a picture (H, W) in [0, 1]: log10|M_ij| over the 6 decades below the largest entry
    (0 = smaller or zero), max-pooled to at most ``max_side`` pixels a side (small entries stay visible
    next to large ones; a pooled pixel shows the largest entry it covers)."""
    m = matrix.detach().abs().float()
    k = max(1, math.ceil(max(m.shape) / max_side))
    if k > 1:
        m = F.max_pool2d(m[None, None], k, ceil_mode=True)[0, 0]
    top = m.max()
    if not top > 0:
        return torch.zeros_like(m)
    return ((torch.log10(m.clamp_min(top * 1e-6) / top) + 6) / 6).clamp(0, 1)


class DiagCurvature(Curvature):
    kind = "diag"

    def __init__(self, values: Mapping[str, Tensor]):
        super().__init__({n: v.shape for n, v in values.items()})
        self.values = dict(values)

    def matvec(self, v):
        return {n: f * v[n] for n, f in self.values.items()}

    def solve(self, g, damping):
        return {n: g[n] / (f + damping) for n, f in self.values.items()}

    def add_(self, other, weight=1.0):
        for n, f in other.diagonal().items():
            self.values[n] = self.values[n] + weight * f
        return self

    def scale_(self, weight):
        self.values = {n: weight * f for n, f in self.values.items()}
        return self

    def to_dense(self):
        return torch.diag(flat(self.values, list(self.shapes)))

    def diagonal(self):
        return dict(self.values)

    def state_dict(self):
        return {"kind": self.kind, "values": dict(self.values)}


class DenseCurvature(Curvature):
    """F = ``matrix``, or F = ``factor``ᵀ ``factor`` (M × P, M < P) until a matrix is needed."""

    kind = "dense"

    def __init__(self, shapes, matrix: Tensor | None = None, factor: Tensor | None = None):
        super().__init__(shapes)
        self.matrix, self.factor = matrix, factor

    def _dense(self) -> Tensor:
        return self.matrix if self.matrix is not None else self.factor.T @ self.factor

    def matvec(self, v):
        x = flat(v, list(self.shapes))
        y = self.matrix @ x if self.matrix is not None else self.factor.T @ (self.factor @ x)
        return unflat(y, self.shapes)

    def quadratic(self, delta):
        x = flat(delta, list(self.shapes))
        if self.matrix is not None:
            return x @ (self.matrix @ x)
        return (self.factor @ x).square().sum()

    def solve(self, g, damping):
        x = flat(g, list(self.shapes))
        if self.factor is not None and self.factor.shape[0] < self.factor.shape[1]:
            u = self.factor  # Woodbury: an M×M system
            small = u @ u.T
            small.diagonal().add_(damping)
            y = (x - u.T @ torch.cholesky_solve((u @ x)[:, None], torch.linalg.cholesky(small))[:, 0]) / damping
        else:
            m = self._dense().clone()
            m.diagonal().add_(damping)
            y = torch.cholesky_solve(x[:, None], torch.linalg.cholesky(m))[:, 0]
        return unflat(y, self.shapes)

    def add_(self, other, weight=1.0):
        if (
            isinstance(other, DenseCurvature)
            and self.factor is not None
            and other.factor is not None
            and weight >= 0
            and self.factor.shape[0] + other.factor.shape[0] < self.n_params
        ):
            self.factor = torch.cat([self.factor, math.sqrt(weight) * other.factor])
        else:
            self.matrix, self.factor = self._dense() + weight * other.to_dense(), None
        return self

    def scale_(self, weight):
        if self.factor is not None and weight >= 0:
            self.factor = math.sqrt(weight) * self.factor
        else:
            self.matrix, self.factor = weight * self._dense(), None
        return self

    def to_dense(self):
        return self._dense()

    def diagonal(self):
        d = self.matrix.diagonal() if self.matrix is not None else self.factor.square().sum(0)
        return unflat(d.clone(), self.shapes)

    def state_dict(self):
        return {"kind": self.kind, "shapes": dict(self.shapes), "matrix": self.matrix, "factor": self.factor}


class KFACCurvature(Curvature):
    """``layers``: name → {"weight": name, "bias": name | None, "terms": [(w, A, G), ...]} with
    F_layer = Σ w · G ⊗ A over the layer's (out, in + bias) matrix; ``rest``: diagonal entries of the
    other parameters."""

    kind = "kfac"

    def __init__(self, shapes, layers: dict[str, dict[str, Any]], rest: dict[str, Tensor]):
        super().__init__(shapes)
        self.layers, self.rest = layers, dict(rest)

    def _mat(self, layer: dict, v: Mapping[str, Tensor]) -> Tensor:
        w = v[layer["weight"]].reshape(self.shapes[layer["weight"]][0], -1)
        return w if layer["bias"] is None else torch.cat([w, v[layer["bias"]][:, None]], 1)

    def _split(self, layer: dict, m: Tensor, out: dict[str, Tensor]) -> None:
        shape = self.shapes[layer["weight"]]
        if layer["bias"] is None:
            out[layer["weight"]] = m.reshape(shape)
        else:
            out[layer["weight"]] = m[:, :-1].reshape(shape)
            out[layer["bias"]] = m[:, -1]

    def matvec(self, v):
        out = {n: f * v[n] for n, f in self.rest.items()}
        for layer in self.layers.values():
            m = self._mat(layer, v)
            self._split(layer, sum(w * (g @ m @ a) for w, a, g in layer["terms"]), out)
        return {n: out[n] for n in self.shapes}

    def solve(self, g, damping):
        out = {n: g[n] / (f + damping) for n, f in self.rest.items()}
        for name, layer in self.layers.items():
            if len(layer["terms"]) != 1:
                raise ValueError(f"KFAC solve needs one Kronecker term per layer; layer {name} has a sum")
            w, a, gg = layer["terms"][0]
            la, qa = torch.linalg.eigh(a)
            lg, qg = torch.linalg.eigh(gg)
            m = qg.T @ self._mat(layer, g) @ qa
            m = m / (w * lg[:, None] * la[None, :] + damping)
            self._split(layer, qg @ m @ qa.T, out)
        return {n: out[n] for n in self.shapes}

    def add_(self, other, weight=1.0):
        if not isinstance(other, KFACCurvature) or other.layers.keys() != self.layers.keys():
            raise ValueError("KFAC add_: the other Fisher must be KFAC over the same layers")
        for name, layer in self.layers.items():
            layer["terms"] = layer["terms"] + [(weight * w, a, g) for w, a, g in other.layers[name]["terms"]]
        self.rest = {n: f + weight * other.rest[n] for n, f in self.rest.items()}
        return self

    def scale_(self, weight):
        for layer in self.layers.values():
            layer["terms"] = [(weight * w, a, g) for w, a, g in layer["terms"]]
        self.rest = {n: weight * f for n, f in self.rest.items()}
        return self

    def _offsets(self) -> dict[str, int]:
        offsets, i = {}, 0
        for n, s in self.shapes.items():
            offsets[n] = i
            i += math.prod(s)
        return offsets

    def to_dense(self):
        """The block-diagonal matrix in named_params order (cross-layer blocks zero)."""
        first = next(iter(self.rest.values()), None)
        ref = first if first is not None else next(iter(self.layers.values()))["terms"][0][1]
        p = self.n_params
        out = torch.zeros(p, p, dtype=ref.dtype, device=ref.device)
        offsets = self._offsets()
        for n, f in self.rest.items():
            idx = torch.arange(f.numel(), device=ref.device) + offsets[n]
            out[idx, idx] = f.reshape(-1)
        for layer in self.layers.values():
            n_out, n_in = self.shapes[layer["weight"]][0], math.prod(self.shapes[layer["weight"]][1:])
            block = sum(w * _kron(g, a) for w, a, g in layer["terms"])
            o = torch.arange(n_out, device=ref.device)
            cols = torch.arange(n_in, device=ref.device)
            idx = (offsets[layer["weight"]] + o[:, None] * n_in + cols[None, :]).reshape(n_out, n_in)
            if layer["bias"] is not None:
                idx = torch.cat([idx, (offsets[layer["bias"]] + o)[:, None]], 1)
            idx = idx.reshape(-1)
            out[idx[:, None], idx[None, :]] = block
        return out

    def image(self, max_side: int = 1024) -> Tensor:
        """The block-diagonal matrix as a picture; above ``DENSE_LIMIT`` parameters use
        :meth:`factor_images` (the P × P matrix would not fit)."""
        if self.n_params > DENSE_LIMIT:
            raise ValueError(f"KFAC image: {self.n_params:,} parameters, above {DENSE_LIMIT:,}; use factor_images()")
        return super().image(max_side)

    def factor_images(self, max_side: int = 1024) -> dict[str, Tensor]:
        """``<layer>/A`` and ``<layer>/G`` pictures of each layer's factors (its latest Kronecker term)."""
        out = {}
        for name, layer in self.layers.items():
            _, a, g = layer["terms"][-1]
            out[f"{name or 'model'}/A"], out[f"{name or 'model'}/G"] = picture(a, max_side), picture(g, max_side)
        return out

    def diagonal(self):
        out = dict(self.rest)
        for layer in self.layers.values():
            d = sum(w * torch.outer(g.diagonal(), a.diagonal()) for w, a, g in layer["terms"])
            self._split(layer, d, out)
        return {n: out[n] for n in self.shapes}

    def state_dict(self):
        layers = {
            name: {
                "weight": lay["weight"],
                "bias": lay["bias"],
                "weights": [float(w) for w, _, _ in lay["terms"]],
                "A": [a for _, a, _ in lay["terms"]],
                "G": [g for _, _, g in lay["terms"]],
            }
            for name, lay in self.layers.items()
        }
        return {"kind": self.kind, "shapes": dict(self.shapes), "layers": layers, "rest": dict(self.rest)}


def _kron(g: Tensor, a: Tensor) -> Tensor:
    """kron(G, A) (torch.kron refuses some non-contiguous einsum results)."""
    return (g[:, None, :, None] * a[None, :, None, :]).reshape(g.shape[0] * a.shape[0], -1)


def from_state(state: Mapping[str, Any]) -> Curvature:
    """The inverse of ``Curvature.state_dict()``."""
    kind = state["kind"]
    if kind == "diag":
        return DiagCurvature(state["values"])
    if kind == "dense":
        return DenseCurvature(state["shapes"], state["matrix"], state["factor"])
    layers = {
        name: {
            "weight": lay["weight"],
            "bias": lay["bias"],
            "terms": list(zip(lay["weights"], lay["A"], lay["G"], strict=True)),
        }
        for name, lay in state["layers"].items()
    }
    return KFACCurvature(state["shapes"], layers, state["rest"])
