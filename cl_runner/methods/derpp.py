"""DER++ (Buzzega et al. 2020): DER plus the cross-entropy of memory samples' own labels.

    L = CE(f(x), y)  +  α · MSE(f(x'), z')  +  β · CE(f(x''), y''),   (x', z'), (x'', y'') ~ memory

with two independent memory draws per step, ``replay_batch`` samples each (without replacement
within a draw), as mammoth at the paper's commit (aimagelab/mammoth c66408f, ``models/derpp.py``):
the first draw's logits for the MSE, the second draw's labels for the cross-entropy. Everything else
(which logits are stored, over which units, when) is DER's (:mod:`cl_runner.methods.der`).

Output units of the memory cross-entropy: a sample of task j, trained while training task t, over the
units that test task j then (``stream.eval_units(t, j)``): with ``active_units=all`` every unit
(mammoth's S-MNIST: ``F.cross_entropy`` over the whole 10-unit head), in class-IL with the seen-class
mask every class seen so far, in domain-IL the shared head, in task-IL task j's own head (mammoth
trains task-IL on the whole head; the DER table has no task-IL MNIST column). ER-ACE's authors'
code (pclucas14/AML ``methods/der.py``) draws one batch of 2 · ``buffer_batch_size`` and splits it
in two (disjoint halves); mammoth's two independent draws are followed here. No strength: α, β are
``alpha`` and ``beta``; ``lambda`` is refused.
"""

from __future__ import annotations

from torch import Tensor

from cl_runner.methods.base import Batch, cross_entropy
from cl_runner.methods.der import DER
from cl_runner.options import Float, check


class DERpp(DER):
    name = "derpp"
    draws = 2

    def __init__(self, strength: float, buffer_size: int, replay_batch: int | None, alpha: float, beta: float):
        super().__init__(strength, buffer_size, replay_batch, alpha)
        self.beta = float(check("method.beta", beta, Float(lo=0.0)))

    def loss(self, batch: Batch, logits: Tensor) -> Tensor | None:
        dark = super().loss(batch, logits)
        if dark is None:
            return None
        start = self._sizes[0] + self._sizes[1]
        su = None if batch.sample_units is None else batch.sample_units[start:]
        return dark + self.beta * cross_entropy(logits[start:], batch.y[start:], batch.units, su)
