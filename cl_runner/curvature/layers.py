"""The one layer pass: forward hooks on a model's ``nn.Linear`` / ``nn.Conv2d`` layers, one batched
forward per chunk, then one backward per scalar the caller picks from the logits.

For each chunk of samples the pass records every hooked layer's input a and output, then
differentiates each picked scalar (a class's summed log-likelihood, the chosen labels' one, MAS's
squared output norm) w.r.t. the layers' outputs: δ. A sample's gradient of a layer's weight is
δ aᵀ (Linear on (B, in)), or Σ_t δ_t a_tᵀ over the output positions t (a convolution, a = the
expanded input patch, :func:`expand`): so every per-sample quantity the estimators need (the Linear
closed form, per-sample gradient rows, KFAC's factors) comes from (a, δ) without a per-sample
backward. Samples do not mix in eval mode (the caller's job), so one backward of a sum over the
chunk's samples gives each sample's own δ. A layer that does not run exactly once per forward
(shared weights) raises :class:`LayerReused`; callers then take the ``torch.func`` path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: (per-sample weight or None, the scalar to differentiate): e.g. (p(c|x), Σ_n log p(c|x_n))
Pick = tuple[Tensor | None, Tensor]
#: picks(logits of the chunk, index of its first sample) → the scalars to differentiate, in order
Picker = Callable[[Tensor, int], Sequence[Pick]]


class LayerReused(ValueError):
    """A hooked layer did not run exactly once in one forward: per-layer per-sample gradients do not apply."""


def hookable(module: nn.Module) -> bool:
    """A layer whose per-sample weight gradient is Σ_t δ_t a_tᵀ: Linear, or an ungrouped zero-padded Conv2d."""
    return type(module) is nn.Linear or (
        type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
    )


def layer_table(model: nn.Module, names: Mapping[str, Tensor]) -> tuple[dict[str, dict], set[str]]:
    """name → {"weight", "bias" (parameter names or None), "module"} of the hookable layers whose weight
    is in ``names``, and the parameter names they cover."""
    layers, covered = {}, set()
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if not hookable(module) or getattr(module, "weight", None) is None or prefix + "weight" not in names:
            continue
        bias = prefix + "bias" if module.bias is not None and prefix + "bias" in names else None
        layers[mname] = {"weight": prefix + "weight", "bias": bias, "module": module}
        covered |= {prefix + "weight"} | ({bias} if bias else set())
    return layers, covered


def layer_pass(
    model: nn.Module, modules: Sequence[nn.Module], x: Tensor, chunk: int, picks: Picker
) -> Iterator[tuple[list[Tensor], Iterator[tuple[Tensor | None, list[Tensor]]]]]:
    """Per chunk of ``chunk`` samples: (the inputs of ``modules`` as they received them, an iterator of
    (weight, [∂ scalar / ∂ output of each module]) for each pick, in order). A module whose output
    does not reach the scalar gets zeros. Consume a chunk's picks before asking for the next chunk."""
    for s in range(0, len(x), chunk):
        inputs, outputs, chosen = _forward(model, modules, x[s : s + chunk], picks, s)
        yield inputs, _backward(chosen, outputs)


def _forward(model, modules, x, picks, start):
    seen: list[list[tuple[Tensor, Tensor]]] = [[] for _ in modules]

    def recorder(i):
        def record(module, inp, out):
            seen[i].append((inp[0].detach(), out))
            return out.clone()  # an in-place op after the layer (ReLU(inplace=True)) acts on the copy

        return record

    handles = [m.register_forward_hook(recorder(i)) for i, m in enumerate(modules)]
    try:
        with torch.enable_grad():
            z = model(x)
    finally:
        for h in handles:
            h.remove()
    if any(len(v) != 1 for v in seen):
        raise LayerReused("a Linear/Conv2d layer does not run exactly once per forward")
    with torch.enable_grad():
        chosen = picks(z, start)
    return [v[0][0] for v in seen], [v[0][1] for v in seen], chosen


def _backward(chosen, outputs):
    for i, (w, scalar) in enumerate(chosen):
        grads = torch.autograd.grad(scalar, outputs, retain_graph=i < len(chosen) - 1, allow_unused=True)
        yield w, [torch.zeros_like(o) if g is None else g for g, o in zip(grads, outputs, strict=True)]


def expand(module: nn.Module, inp: Tensor, bias: bool) -> Tensor:
    """Layer inputs as (B, T, in [+1]): T = 1 for a Linear on (B, in), the expanded patches of a conv;
    with ``bias`` a column of ones (the bias as an input)."""
    if isinstance(module, nn.Conv2d):
        a = F.unfold(inp, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
    else:
        a = inp.reshape(inp.shape[0], -1, inp.shape[-1])
    if bias:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], 2)
    return a


def per_position(d: Tensor) -> Tensor:
    """Output gradients as (B, T, out): conv (B, out, H, W) → positions; Linear (B, …, out)."""
    if d.dim() == 4:
        return d.flatten(2).transpose(1, 2)
    return d.reshape(d.shape[0], -1, d.shape[-1])
