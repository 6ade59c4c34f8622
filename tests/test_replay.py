"""Replay (cl_runner/methods/replay.py): the vectorized reservoir equals Vitter's sequential
algorithm R on the same draws; replayed samples get their task's evaluation units in every scenario;
the memory and its generator survive a checkpoint (resume = uninterrupted run); on split digits
class-IL replay beats finetune by far."""

from __future__ import annotations

import contextlib
import io
import random

import pytest
import torch
from conftest import compose_config, defaults

from cl_runner.data.benchmarks import build_stream
from cl_runner.methods import build_method, method_from_config
from cl_runner.methods.base import Batch
from cl_runner.methods.replay import Replay, reservoir_slots
from cl_runner.models import build_model
from cl_runner.run import run_experiment
from cl_runner.trainer import Trainer, make_optimizer_factory, task_loss


def sequential_reservoir(size: int, draws: list[float]) -> list[int]:
    """Algorithm R, one sample at a time: the memory holds sample ids (-1 = empty slot)."""
    memory = [-1] * size
    for m, u in enumerate(draws):
        if m < size:
            memory[m] = m
        else:
            j = int(u * (m + 1))  # j ~ U{0, …, m}
            if j < size:
                memory[j] = m
    return memory


@pytest.mark.parametrize("size, batches", [(5, [3, 7, 7, 7, 40]), (16, [64] * 6), (100, [1, 2, 256, 3, 500])])
def test_vectorized_reservoir_equals_the_sequential_algorithm(size, batches):
    replay = Replay(0.0, size, None)
    replay.generator.manual_seed(size)
    draws = torch.Generator().manual_seed(size)  # the same draws, replayed by hand
    seen = 0
    all_draws: list[float] = []
    for b in batches:
        ids = torch.arange(seen, seen + b)
        replay.store(Batch(ids.float().unsqueeze(1), ids, (0, 1), None, task=0))
        all_draws += torch.rand(b, generator=draws, dtype=torch.float64).tolist()
        seen += b
        expected = sequential_reservoir(size, all_draws)
        got = replay.memory["y"].tolist()[: min(seen, size)]
        assert got == expected[: min(seen, size)]
        assert replay.memory["x"][: min(seen, size), 0].long().tolist() == got
    # several samples of one batch drew the same slot (the last one must win)
    m = torch.arange(seen - batches[-1], seen)
    j = (torch.tensor(all_draws[-batches[-1] :], dtype=torch.float64) * (m + 1)).floor().long()
    j = j[(j < size) & (m >= size)]
    assert len(j.unique()) < len(j) or size == 100


def test_reservoir_keeps_every_sample_with_the_same_probability():
    """size / n for each of n samples (binomial bound, 2000 reservoirs of 10 out of 50)."""
    size, n, runs = 10, 50, 2000
    counts = torch.zeros(n)
    g = torch.Generator().manual_seed(0)
    for _ in range(runs):
        draws = torch.rand(n, generator=g, dtype=torch.float64)
        slots, sources = reservoir_slots(0, draws, size)
        assert torch.equal(slots, torch.arange(size))
        counts[sources] += 1
    p = size / n
    sd = (runs * p * (1 - p)) ** 0.5
    assert ((counts - runs * p).abs() < 4.5 * sd).all(), counts


def _stream(scenario: str, n_tasks: int = 3):
    cfg = compose_config("benchmark=split_digits", f"benchmark.n_tasks={n_tasks}", f"scenario={scenario}")
    return build_stream(cfg.benchmark, cfg.scenario, 0, "cpu", ".")


@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_replayed_samples_train_on_their_tasks_eval_units(scenario):
    stream = _stream(scenario)
    replay = build_method("replay", None, {"buffer_size": 64})
    replay.setup(None, stream, seed=0)
    for t in (0, 1):  # fill the memory with tasks 0 and 1
        replay.before_task(None, stream[t])
        task = stream[t]
        replay.store(Batch(task.x_train[:200], task.y_train[:200], task.units, None, t))
    t = 2
    replay.before_task(None, stream[t])
    task = stream[t]
    batch = replay.training_batch(Batch(task.x_train[:32], task.y_train[:32], task.units, None, t))
    assert len(batch) == 64 and torch.equal(batch.x[:32], task.x_train[:32])
    # which memory samples were drawn: find each replayed x in the memory
    mem = replay.memory
    where = (batch.x[32:].flatten(1)[:, None] == mem["x"].flatten(1)[None]).all(-1).float().argmax(1)
    tasks = mem["task"][where]
    assert set(tasks.tolist()) == {0, 1}
    assert torch.equal(batch.y[32:], mem["y"][where])
    want = torch.tensor([stream.eval_units(t, int(j)) for j in tasks])
    if scenario == "task":  # each sample on its own task's head
        assert batch.sample_units is not None
        assert torch.equal(batch.sample_units[32:], want)
        assert torch.equal(batch.sample_units[:32], torch.tensor(task.units).expand(32, 2))
    else:  # class-IL: all seen classes; domain-IL: the shared head — one range for all
        assert batch.sample_units is None and (want == torch.tensor(batch.units)).all()
    # the loss the trainer computes is the mean per-sample CE over each sample's own units
    logits = torch.randn(len(batch), stream.n_outputs, generator=torch.Generator().manual_seed(0))
    units = batch.sample_units if batch.sample_units is not None else torch.tensor(batch.units).expand(64, 2)
    brute = torch.stack(
        [
            torch.nn.functional.cross_entropy(logits[i : i + 1, lo:hi], batch.y[i : i + 1] - lo)
            for i, (lo, hi) in enumerate(units.tolist())
        ]
    ).mean()
    assert torch.allclose(task_loss(logits, batch.y, batch.units, batch.sample_units), brute)
    replay.after_step(None, batch)  # stores the 32 current samples only
    assert replay.n_seen == 400 + 32


def test_replay_batch_and_an_empty_memory():
    stream = _stream("class", 2)
    replay = build_method("replay", None, {"buffer_size": 10, "replay_batch": 4})
    replay.setup(None, stream, seed=0)
    replay.before_task(None, stream[0])
    task = stream[0]
    first = Batch(task.x_train[:8], task.y_train[:8], task.units, None, 0)
    assert replay.training_batch(first) is first  # nothing to replay yet
    replay.after_step(None, first)
    assert replay.n_seen == 8 and replay.filled == 8
    batch = replay.training_batch(Batch(task.x_train[8:16], task.y_train[8:16], task.units, None, 0))
    assert len(batch) == 12
    drawn = batch.x[8:].flatten(1)
    assert len(torch.unique(drawn, dim=0)) == 4  # without replacement


def test_bad_options_are_one_line():
    for key, value in (("buffer_size", 0), ("buffer_size", 1.5), ("replay_batch", -1)):
        with pytest.raises(ValueError, match=f"method.{key}="):
            build_method("replay", None, {key: value})
    with pytest.raises(ValueError, match="no regularization strength"):
        method_from_config(
            {**defaults("replay"), "name": "replay", "_target_": "cl_runner.methods.replay.Replay", "_partial_": True},
            1.0,
        )


def _trainer(stream, seed=0, checkpoint=None):
    cfg = compose_config("model=mlp", "model.hidden=[32]")
    torch.manual_seed(seed)
    model = build_model(cfg.model, stream.input_shape, stream.n_outputs)
    method = build_method("replay", None, {"buffer_size": 50})
    opt = make_optimizer_factory(cfg.optimizer)
    return Trainer(model, method, stream, opt, batch_size=16, epochs=2, seed=seed, checkpoint=checkpoint)


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_resume_from_a_checkpoint_gives_the_same_matrix(scenario, one_thread):
    stream = _stream(scenario)
    saved = []

    def keep(state):
        buffer = io.BytesIO()
        torch.save(state, buffer)  # as the run folder's checkpoint.pt: a copy, not live tensors
        saved.append(buffer.getvalue())

    full = _trainer(stream, checkpoint=keep).run()
    after_first = torch.load(io.BytesIO(saved[0]), weights_only=False)
    assert after_first["method"]["n_seen"] > 0 and after_first["method"]["memory"]["x"].shape[0] == 50
    resumed = _trainer(stream, seed=0).run(resume=after_first)
    assert resumed.matrix == full.matrix  # bitwise
    other = _trainer(stream, seed=1).run()
    assert other.matrix != full.matrix


@pytest.mark.slow
def test_replay_beats_finetune_on_split_digits_class_il(tmp_path, one_thread):
    """Class-IL split digits (5 tasks of 2 classes): finetune keeps only the last task (ACC ≈ 20 %);
    replay with the default memory of 1000 keeps the others."""
    results = {}
    for method in ("finetune", "replay"):
        cfg = compose_config("benchmark=split_digits", "scenario=class", f"method={method}", "epochs=3", "device=cpu")
        with contextlib.redirect_stdout(io.StringIO()):
            results[method] = run_experiment(cfg, tmp_path / method)
    acc_f, acc_r = results["finetune"]["acc"], results["replay"]["acc"]
    assert acc_r >= acc_f + 0.20, (acc_f, acc_r)


def test_contract_random_state_untouched():
    """The memory's draws never touch the global RNG."""
    stream = _stream("class", 2)
    replay = build_method("replay", None, {"buffer_size": 10})
    replay.setup(None, stream, seed=0)
    replay.before_task(None, stream[0])
    state = torch.get_rng_state()
    py = random.getstate()
    task = stream[0]
    for s in range(0, 64, 8):
        b = replay.training_batch(Batch(task.x_train[s : s + 8], task.y_train[s : s + 8], task.units, None, 0))
        replay.after_step(None, b)
    assert torch.equal(state, torch.get_rng_state()) and random.getstate() == py
