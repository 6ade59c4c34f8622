"""Methods that each break one rule of the method contract (cl_runner/contract.py), for the tests that
check the contract names the rule: tests/test_contract.py builds them by `method._target_=`."""

from __future__ import annotations

import torch

from cl_runner.methods import Method, named_params
from cl_runner.methods.l2 import L2
from cl_runner.methods.regularizer import snapshot


class TrainModePass(L2):
    """Its importance pass runs the model forward in train mode (no eval_mode)."""

    def after_task(self, model, task):
        with torch.no_grad():
            model(task.x_train[:4])
        super().after_task(model, task)


class ChangesParameters(L2):
    """Its importance pass moves the parameters."""

    def after_task(self, model, task):
        super().after_task(model, task)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.99)


class ResetsTrainingFlags(L2):
    """Its importance pass ends with model.train(): every module in train mode, whatever it was."""

    def after_task(self, model, task):
        model.eval()
        with torch.no_grad():
            model(task.x_train[:4])
        model.train()
        super().after_task(model, task)


class UsesGlobalRandom(L2):
    """Its importance pass draws from torch's global generator."""

    def after_task(self, model, task):
        torch.randperm(len(task.x_train))
        super().after_task(model, task)


class ForgetsOnResume(L2):
    """Its anchor is not in its checkpoint: a resumed run trains without the penalty."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class Note:
    """Not a tensor, number, string, list or dict: a checkpoint holding it cannot be loaded safely."""


class UnsafeState(L2):
    def state_dict(self):
        return {**super().state_dict(), "note": Note()}


class HidesNonFinite(Method):
    """L2 whose penalty replaces a non-finite anchor by the parameter itself: NaN in its state never
    shows, the run goes on as if nothing happened."""

    uses_strength = True

    def __init__(self, strength):
        super().__init__(strength)
        self.anchor = {}

    def after_task(self, model, task):
        self.anchor = snapshot(model)

    def penalty(self, model):
        if not self.anchor:
            return None
        terms = []
        for n, p in named_params(model).items():
            a = self.anchor[n]
            terms.append((p - torch.where(torch.isfinite(a), a, p.detach())).square().sum())
        return torch.stack(terms).sum()
