"""Datasets, task transforms and task streams. Importing the package registers every loader
(``digits`` from scikit-learn; MNIST, Fashion-MNIST, KMNIST, CIFAR-10/100 through torchvision,
imported lazily inside those loaders)."""

from cl_runner.data import datasets, vision  # noqa: F401  (registers the loaders)
