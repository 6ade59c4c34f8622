"""Finetune: no regularization; the lower bound every table reports (the "None" row)."""

from cl_runner.methods.base import Method


class Finetune(Method):
    """Plain sequential training. Has no strength: a non-zero ``lambda`` is refused."""

    name = "finetune"
    stackable = True  # the vectorized launcher may train it stacked (cl_runner/stacked.py)
