"""The layer pass."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_runner.curvature.labels import _log_softmax


def _kfac_layers(model: nn.Module, names: set[str]) -> list[tuple[str, nn.Module]]:
    """Linear and (ungrouped) Conv2d modules whose weight is trainable."""
    out = []
    for mname, module in model.named_modules():
        w = getattr(module, "weight", None)
        ok = type(module) is nn.Linear or (
            type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
        )
        if ok and w is not None and (f"{mname}.weight" if mname else "weight") in names:
            out.append((mname, module))
    return out


def _layer_table(model: nn.Module, names: Mapping[str, Tensor]) -> tuple[dict[str, dict], set[str]]:
    """name → {"weight", "bias" (param names or None), "module"} of the Linear/Conv2d layers, and the
    parameter names they cover."""
    layers, covered = {}, set()
    for mname, module in _kfac_layers(model, set(names)):
        prefix = f"{mname}." if mname else ""
        bias = prefix + "bias" if module.bias is not None and prefix + "bias" in names else None
        layers[mname] = {"weight": prefix + "weight", "bias": bias, "module": module}
        covered |= {prefix + "weight"} | ({bias} if bias else set())
    return layers, covered


class LayerReused(ValueError):
    """A Linear/Conv2d layer ran more than once in one forward: per-layer per-sample gradients do not apply."""


def _layer_pass(model, layers, x, lo, hi, mask, target, chunk):
    """One batched forward per chunk with hooks on ``layers``, then one backward per class (``all``)
    or one for the chosen labels. Yields (new_chunk, inputs, w, deltas): the layers' expanded inputs
    a (B, T, in [+1 for the bias]), the weight w (B,) of this class (p(c|x); 1 for a chosen label)
    and the gradients δ (B, T, out) of log p(c|x) w.r.t. the layers' outputs. Samples do not mix
    (eval mode), so one backward of the summed log-likelihood gives every sample's own δ."""
    for s in range(0, len(x), chunk):
        seen: dict[str, list] = {m: [] for m in layers}

        def record(module, inp, out, mname, seen=seen):
            seen[mname].append((inp[0].detach(), out))
            return out.clone()  # an in-place op after the layer (ReLU(inplace=True)) acts on the copy

        hooks = [
            lay["module"].register_forward_hook(lambda m, i, o, n=n: record(m, i, o, n)) for n, lay in layers.items()
        ]
        try:
            with torch.enable_grad():
                logp = _log_softmax(model(x[s : s + chunk])[:, lo:hi], None if mask is None else mask[s : s + chunk])
        finally:
            for h in hooks:
                h.remove()
        if any(len(v) != 1 for v in seen.values()):
            raise LayerReused("Fisher: a Linear/Conv2d layer is applied more than once per forward")
        outs = [seen[m][0][1] for m in layers]
        acts = [_expand(lay["module"], seen[m][0][0], lay["bias"] is not None) for m, lay in layers.items()]
        if target is None:
            p = logp.detach().exp()
            picks = [(p[:, c], logp[:, c].sum()) for c in range(hi - lo)]
        else:
            picks = [(torch.ones_like(logp[:, 0]).detach(), logp.gather(1, target[s : s + chunk, None]).sum())]
        for i, (w, scalar) in enumerate(picks):
            grads = torch.autograd.grad(scalar, outs, retain_graph=i < len(picks) - 1, allow_unused=True)
            deltas = [_per_position(torch.zeros_like(o) if d is None else d) for d, o in zip(grads, outs, strict=True)]
            yield i == 0, acts, w, deltas


def _expand(module: nn.Module, inp: Tensor, bias: bool) -> Tensor:
    """Layer inputs as (B, T, in): T = 1 for a Linear on (B, in), the expanded patches of a conv."""
    if isinstance(module, nn.Conv2d):
        a = F.unfold(inp, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
    else:
        a = inp.reshape(inp.shape[0], -1, inp.shape[-1])
    if bias:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], 2)
    return a


def _per_position(d: Tensor) -> Tensor:
    """Output gradients as (B, T, out): conv (B, out, H, W) → positions; Linear (B, …, out)."""
    if d.dim() == 4:
        return d.flatten(2).transpose(1, 2)
    return d.reshape(d.shape[0], -1, d.shape[-1])
