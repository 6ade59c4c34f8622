import pytest
import torch

from cl_runner.data import transforms as T
from cl_runner.data.benchmarks import build_stream
from cl_runner.data.stream import assign_units, batch_indices
from cl_runner.trainer import evaluate, task_loss

SPLIT = {"name": "split_digits", "kind": "split", "dataset": "digits", "n_tasks": 5, "classes_per_task": 2}
PERM = {"name": "permuted_digits", "kind": "permuted", "dataset": "digits", "n_tasks": 3}


def test_units_per_scenario():
    groups = [[0, 1], [2, 3], [4, 5]]
    assert assign_units(groups, "task") == ([(0, 2), (2, 4), (4, 6)], [(0, 2), (2, 4), (4, 6)], 6)
    assert assign_units(groups, "domain") == ([(0, 2)] * 3, [(0, 2)] * 3, 2)
    assert assign_units(groups, "class") == ([(0, 2), (0, 4), (0, 6)], [(0, 2), (2, 4), (4, 6)], 6)
    with pytest.raises(ValueError, match="same number of classes"):
        assign_units([[0, 1], [2, 3, 4]], "domain")


@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_split_digits_tasks_hold_their_classes(scenario):
    s = build_stream(SPLIT, scenario, seed=0, device="cpu", data_dir=".")
    assert len(s) == 5 and s.input_shape == (1, 8, 8)
    assert s.n_outputs == (2 if scenario == "domain" else 10)
    for t, task in enumerate(s):
        assert task.classes == [2 * t, 2 * t + 1]
        lo, hi = task.own_units
        assert task.y_train.min() >= lo and task.y_train.max() < hi  # targets on the task's own units
        assert set(task.y_test.tolist()) == set(range(lo, hi))
        assert task.x_train.dtype == torch.float32 and 0 <= task.x_train.min() and task.x_train.max() <= 1
    # task 2's units in class-IL: every class seen so far is active
    assert s[2].units == ((4, 6) if scenario == "task" else (0, 2) if scenario == "domain" else (0, 6))
    assert s.eval_units(trained=3, j=1) == (
        (2, 4) if scenario == "task" else (0, 2) if scenario == "domain" else (0, 8)
    )


def test_test_split_is_fixed_by_the_seed_and_disjoint_from_train():
    a = build_stream(SPLIT, "domain", seed=0, device="cpu", data_dir=".")
    b = build_stream(SPLIT, "domain", seed=0, device="cpu", data_dir=".")
    c = build_stream(SPLIT, "domain", seed=1, device="cpu", data_dir=".")
    assert torch.equal(a[0].x_test, b[0].x_test)
    assert not torch.equal(a[0].x_test, c[0].x_test)
    train = {tuple(x.flatten().tolist()) for x in a[0].x_train}
    test = {tuple(x.flatten().tolist()) for x in a[0].x_test}
    assert len(test - train) > 0.9 * len(test)  # a few digits images are exact duplicates


def test_permuted_tasks_are_pixel_permutations_of_the_same_images():
    s = build_stream(PERM, "domain", seed=0, device="cpu", data_dir=".")
    x0, x1 = s[0].x_train.flatten(1), s[1].x_train.flatten(1)
    assert torch.equal(s[0].y_train, s[1].y_train)
    assert not torch.equal(x0, x1)
    assert torch.equal(x0.sort(dim=1).values, x1.sort(dim=1).values)  # same pixel values per image
    unpermuted = build_stream({**PERM, "permute_first": False}, "domain", seed=0, device="cpu", data_dir=".")
    plain = build_stream({**SPLIT, "n_tasks": 1, "classes_per_task": 10}, "domain", seed=0, device="cpu", data_dir=".")
    assert torch.equal(unpermuted[0].x_train.sort(0).values, plain[0].x_train.sort(0).values)
    assert torch.equal(unpermuted[1].x_train, s[1].x_train)  # permutation of task 2 independent of the flag


def test_transforms():
    x = torch.rand(3, 1, 28, 28)
    p = T.pad(x, 32)
    assert p.shape == (3, 1, 32, 32) and torch.equal(p[:, :, 2:30, 2:30], x) and p[:, :, :2].abs().sum() == 0
    assert torch.equal(T.rotate(x, 0), x)
    corner = torch.zeros(1, 1, 9, 9)
    corner[0, 0, 0, 8] = 1  # top right; counter-clockwise (as torchvision) it goes to the top left
    assert torch.allclose(T.rotate(corner, 90), torch.rot90(corner, 1, dims=(2, 3)), atol=1e-5)
    assert T.rotate(corner, 90)[0, 0, 0, 0] > 0.99
    n = T.normalize(x, 0.5, 0.25)
    assert torch.allclose(n * 0.25 + 0.5, x, atol=1e-6)


def test_batches_cover_each_sample_once_per_epoch():
    g = torch.Generator().manual_seed(0)
    batches = list(batch_indices(103, 10, g, torch.device("cpu")))
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert sorted(torch.cat(batches).tolist()) == list(range(103))


def test_task_loss_restricts_to_active_units():
    logits = torch.tensor([[5.0, 0.0, 1.0, 2.0]])
    y = torch.tensor([3])
    full = torch.nn.functional.cross_entropy(logits[:, 2:4], torch.tensor([1]))
    assert torch.allclose(task_loss(logits, y, (2, 4)), full)
    # per-sample ranges (joint training in task-IL) give the same value as the slice
    assert torch.allclose(task_loss(logits, y, (0, 4), torch.tensor([[2, 4]])), full)


def test_evaluate_counts_argmax_within_eval_units():
    s = build_stream(SPLIT, "class", seed=0, device="cpu", data_dir=".")

    class Oracle(torch.nn.Module):  # predicts unit 1 for every input
        def forward(self, x):
            out = torch.zeros(x.shape[0], 10)
            out[:, 1] = 1
            return out

    row = evaluate(Oracle(), s, trained=4)
    n1 = (s[0].y_test == 1).float().mean().item()
    assert row[0] == pytest.approx(n1) and row[1:] == [0.0] * 4


def test_class_il_with_every_unit_active_from_the_first_task():
    """active_units=all (docs/protocols/curvature.md: one fixed head): every task trains and is tested on all units."""
    groups = [[0, 1], [2, 3], [4, 5]]
    assert assign_units(groups, "class", "all") == ([(0, 6)] * 3, [(0, 2), (2, 4), (4, 6)], 6)
    s = build_stream(SPLIT, "class", seed=0, device="cpu", data_dir=".", active_units="all")
    assert [t.units for t in s] == [(0, 10)] * 5
    assert s.eval_units(trained=0, j=0) == (0, 10) and s.eval_units(trained=-1, j=4) == (0, 10)

    class Oracle(torch.nn.Module):  # predicts unit 9 for every input: wrong on task 1 only when 9 competes
        def forward(self, x):
            out = torch.zeros(x.shape[0], 10)
            out[:, 1], out[:, 9] = 1, 2
            return out

    seen = build_stream(SPLIT, "class", seed=0, device="cpu", data_dir=".")
    assert evaluate(Oracle(), seen, trained=0)[0] > 0 and evaluate(Oracle(), s, trained=0)[0] == 0
    for scenario in ("task", "domain"):
        with pytest.raises(ValueError, match="active_units=all applies to scenario=class only"):
            assign_units(groups, scenario, "all")
    with pytest.raises(ValueError, match="choose one of: seen, all"):
        assign_units(groups, "class", "some")


def test_clip_grad_norm_clips_the_whole_gradient_before_the_step():
    """One SGD step (lr 1) with clip_grad_norm=c moves the parameters by exactly c along the gradient
    of the task loss + penalty when its norm is above c, and by the gradient itself below."""
    from cl_runner.methods.l2 import L2
    from cl_runner.models import MLP
    from cl_runner.trainer import Trainer

    s = build_stream(SPLIT, "class", seed=0, device="cpu", data_dir=".")
    s.tasks = s.tasks[:1]
    s[0].x_train, s[0].y_train = s[0].x_train[:8], s[0].y_train[:8]
    for clip in (None, 0.05, 1e3):  # the unclipped step's norm is about 0.6
        torch.manual_seed(0)
        model = MLP(s.input_shape, s.n_outputs, hidden=[6])
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        method = L2(5.0)
        trainer = Trainer(
            model,
            method,
            s,
            lambda m: torch.optim.SGD(m.parameters(), lr=1.0),
            batch_size=8,
            iterations=1,
            clip_grad_norm=clip,
        )
        trainer.run()
        step = before - torch.cat([p.detach().flatten() for p in model.parameters()])
        if clip is None:
            free = step
        elif clip < 1:
            assert step.norm().item() == pytest.approx(clip, rel=1e-4)
            assert torch.allclose(step / step.norm(), free / free.norm(), atol=1e-5)  # same direction
        else:
            assert torch.equal(step, free)  # below the threshold: untouched


def test_digits_read_directly_equal_sklearns_loader():
    """cl-runner reads scikit-learn's bundled digits file itself (importing sklearn.datasets costs
    0.7 s of a small run's start-up): the same images and labels as ``load_digits``."""
    import numpy as np
    from sklearn.datasets import load_digits

    from cl_runner.data.datasets import _sklearn_digits

    bunch = load_digits()
    images, target = _sklearn_digits()
    assert images.shape == (1797, 8, 8) and np.array_equal(images, bunch.images)
    assert np.array_equal(target, bunch.target)


def test_digits_fall_back_to_sklearns_loader_where_its_file_is_not(monkeypatch):
    import importlib.util

    import numpy as np
    from sklearn.datasets import load_digits

    from cl_runner.data.datasets import _sklearn_digits

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no file to read directly
    images, target = _sklearn_digits()
    assert np.array_equal(images, load_digits().images) and np.array_equal(target, load_digits().target)
