"""One training step (forward + backward) of M members: separate models one after another vs stacked.

- ``separate``: each member's own ``nn.Module`` (what ``forward=loop`` does; bitwise a separate run);
- ``vmap``: ``torch.func.stack_module_state`` + ``vmap`` over ``functional_call`` (``forward=vmap``);
- ``baddbmm``: hand-batched Linear layers (one ``baddbmm`` per layer), the "batched layers" option.

Prints ms per step for all members together and whether the gradients are bitwise those of the
separate models (else the largest difference).

    python scripts/bench_stacked_step.py --members 16 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from cl_runner.models.mlp import MLP


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for din, batch in ((64, 32), (784, 128)):  # the offline default; permuted MNIST
        one_shape(din, batch, args.members, torch.device(args.device), args.repeats)


def one_shape(din: int, batch: int, n: int, device: torch.device, repeats: int) -> None:
    models = []
    for m in range(n):
        torch.manual_seed(m)
        models.append(MLP((1, din), 10, [400, 400]).to(device))
    xs, ys = torch.randn(n, batch, 1, din, device=device), torch.randint(0, 10, (n, batch), device=device)
    params, _ = stack_module_state(models)
    names = list(params)
    base = copy.deepcopy(models[0]).to("meta")

    def separate():
        grads = []
        for m in range(n):
            for p in models[m].parameters():
                p.grad = None
            F.cross_entropy(models[m](xs[m]), ys[m]).backward()
            grads.append([p.grad for p in models[m].parameters()])
        return grads

    def vmapped():
        for v in params.values():
            v.grad = None
        out = vmap(lambda p, x: functional_call(base, (p,), (x,)))(params, xs)
        sum(F.cross_entropy(out[m], ys[m]) for m in range(n)).backward()
        return [[params[k].grad[m] for k in names] for m in range(n)]

    def batched():
        w = [params[k] for k in names]  # weight, bias per layer
        for v in w:
            v.grad = None
        h = xs.reshape(n, batch, -1)
        for i in range(0, len(w), 2):
            h = torch.baddbmm(w[i + 1].unsqueeze(1), h, w[i].transpose(1, 2))
            h = torch.relu(h) if i < len(w) - 2 else h
        sum(F.cross_entropy(h[m], ys[m]) for m in range(n)).backward()
        return [[w[k].grad[m] for k in range(len(w))] for m in range(n)]

    ref = [[g.clone() for g in gs] for gs in separate()]
    for fn in (separate, vmapped, batched):
        ms, same = _time(fn, ref, device, repeats)
        print(f"MLP {din}-400-400-10, batch {batch}, {n} members, {fn.__name__:>8}: {ms:7.2f} ms/step, {same}")


def _time(fn, ref, device: torch.device, repeats: int) -> tuple[float, str]:
    """ms per call of ``fn`` (after a warm-up), and how its gradients compare with ``ref``."""
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        grads = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - start) / repeats
    pairs = [(a, b) for ga, gb in zip(ref, grads, strict=True) for a, b in zip(ga, gb, strict=True)]
    diff = max(float((a - b).abs().max()) for a, b in pairs)
    return ms, "bitwise" if diff == 0 else f"max |diff| {diff:.1e}"


if __name__ == "__main__":
    main()
