"""DER, DER++, ER-ACE, GDumb and the shared memories (cl_runner/methods/{memory,der,derpp,er_ace,gdumb}.py).

- the memories against plain Python loops on the same draws (reservoir with extras; GDumb's greedy
  class-balanced sampler as the paper describes it, one sample at a time);
- each step's loss against a literal re-implementation of the reference code's ``observe``: mammoth
  c66408f's ER (= ``replay``), DER, DER++ (two forwards, the same memory draws), the authors' ER-ACE
  (pclucas14/AML: masked_fill(-1e9) over present + unseen classes); GDumb's learning-rate schedule
  against the authors' loop;
- every method reduces forgetting on class-IL split digits against finetune (2 seeds);
- resume after task 1 from a checkpoint loaded with ``weights_only=True`` gives the same matrix, bitwise;
- bad options are one line naming ``method.<key>``.
"""

from __future__ import annotations

import contextlib
import io
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config

from cl_runner.data.benchmarks import build_stream
from cl_runner.methods import build_method
from cl_runner.methods.base import Batch
from cl_runner.methods.memory import BalancedMemory, ReservoirMemory, water_fill
from cl_runner.models import build_model
from cl_runner.run import run_experiment
from cl_runner.trainer import Trainer, make_optimizer_factory

# the DER table's S-MNIST setting on the offline digits: one 10-unit head trained on all units,
# plain SGD, batch 10 (mammoth's seq-mnist)
TABLE = ["active_units=all", "optimizer=sgd", "optimizer.lr=0.03", "batch_size=10"]


def _stream(scenario: str = "class", n_tasks: int = 3, *extra: str):
    cfg = compose_config("benchmark=split_digits", f"benchmark.n_tasks={n_tasks}", f"scenario={scenario}", *extra)
    return build_stream(cfg.benchmark, cfg.scenario, 0, "cpu", ".", active_units=cfg.active_units)


def _model(stream, seed: int = 0, hidden: int = 32):
    cfg = compose_config("model=mlp", f"model.hidden=[{hidden}]")
    torch.manual_seed(seed)
    return build_model(cfg.model, stream.input_shape, stream.n_outputs)


# ----------------------------------------------------------------------------- the memories
def test_reservoir_memory_with_extras_equals_the_sequential_algorithm():
    """Algorithm R one sample at a time on the same draws; every extra follows its sample."""
    size, batches = 7, [3, 5, 9, 1, 30]
    mem, gen, draws = ReservoirMemory(size), torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    slots, seen = [-1] * size, 0
    for b in batches:
        ids = torch.arange(seen, seen + b)
        mem.add(gen, ids.float()[:, None], ids, 2, logits=torch.stack([ids * 1.0, -ids * 1.0], 1))
        for u in torch.rand(b, generator=draws, dtype=torch.float64).tolist():
            j = seen if seen < size else int(u * (seen + 1))
            if j < size:
                slots[j] = seen
            seen += 1
        filled = min(seen, size)
        assert mem.filled == filled and mem.tensors["y"][:filled].tolist() == slots[:filled]
        assert torch.equal(mem.tensors["logits"][:filled, 0].long(), mem.tensors["y"][:filled])
        assert torch.equal(mem.tensors["logits"][:filled, 1], -mem.tensors["logits"][:filled, 0])
        assert (mem.tensors["task"][:filled] == 2).all()
    # draws without replacement, never more than the memory holds
    x, y = mem.sample(5, gen, torch.device("cpu"), ("x", "y"))
    assert len(set(y.tolist())) == 5 and set(y.tolist()) <= set(slots)
    (y,) = mem.sample(50, gen, torch.device("cpu"), ("y",))
    assert sorted(y.tolist()) == sorted(slots)
    assert ReservoirMemory(3).sample(2, gen, torch.device("cpu")) is None


class GreedyBalancedReference:
    """GDumb's sampler (Prabhu et al. 2020), one sample at a time, in plain Python:
    with Y the classes seen before this sample and k_c = size // |Y|, a sample of a new class, or of
    a class with fewer than k_c members, is kept — while there is room simply added, else replacing
    a member of the largest class (the lowest class among equals). Which member: the one with the
    smallest key, the keys drawn for the chunk (a member that was in slot s at the chunk's start has
    ``slot_keys[s]``, the chunk's i-th sample ``sample_keys[i]``): the vectorized version's way of
    drawing a uniformly random member."""

    def __init__(self, size):
        self.size = size
        self.members: dict[int, list[int]] = {}  # class -> sample ids

    def offer(self, ids, labels, slot_ids, slot_keys, sample_keys):
        key = {i: slot_keys[s] for s, i in enumerate(slot_ids)}
        key.update({i: k for i, k in zip(ids, sample_keys, strict=True)})
        for i, y in zip(ids, labels, strict=True):
            quota = self.size // len(self.members) if self.members else self.size
            if y in self.members and len(self.members[y]) >= quota:
                continue
            if sum(len(v) for v in self.members.values()) >= self.size:
                top = max(len(v) for v in self.members.values())
                largest = min(c for c, v in self.members.items() if len(v) == top)
                self.members[largest].remove(min(self.members[largest], key=key.__getitem__))
            self.members.setdefault(y, []).append(i)

    def by_class(self):
        return {c: sorted(v) for c, v in self.members.items() if v}


@pytest.mark.parametrize(
    "size, n_classes, chunks, pattern",
    [
        (20, 6, [50, 50, 50, 50], "tasks"),  # class-IL: 3 tasks of 2 classes, quotas 10 → 5 → 3 (+2 free)
        (12, 4, [7, 1, 30, 3, 40], "random"),  # classes in any order, chunks of every size
        (30, 10, [100, 100], "tasks"),  # quotas 15 → … → 3
        (10, 10, [64, 64, 64], "random"),  # one slot per class
        (17, 5, [5] * 20, "skewed"),  # a rare class
    ],
)
def test_balanced_memory_equals_the_sequential_sampler(size, n_classes, chunks, pattern):
    g = torch.Generator().manual_seed(size * 31 + n_classes)
    n = sum(chunks)
    if pattern == "tasks":
        per = -(-n // (n_classes // 2))
        labels = [2 * (i // per) + int(torch.randint(2, (1,), generator=g)) for i in range(n)]
    elif pattern == "skewed":
        labels = [int(c) for c in torch.multinomial(torch.tensor([8.0, 4, 2, 1, 0.2]), n, True, generator=g)]
    else:
        labels = torch.randint(n_classes, (n,), generator=g).tolist()
    mem, gen = BalancedMemory(size, n_classes), torch.Generator().manual_seed(3)
    reference, same_draws = GreedyBalancedReference(size), torch.Generator().manual_seed(3)
    start = 0
    for b in chunks:
        ids = list(range(start, start + b))
        slot_ids = mem.tensors["x"][: mem.filled, 0].long().tolist() if mem.tensors else []
        mem.add(gen, torch.tensor(ids).float()[:, None], torch.tensor(labels[start : start + b]), 0)
        slot_keys = torch.rand(size, generator=same_draws, dtype=torch.float64).tolist()
        sample_keys = torch.rand(b, generator=same_draws, dtype=torch.float64).tolist()
        reference.offer(ids, labels[start : start + b], slot_ids, slot_keys, sample_keys)
        start += b
        want = reference.by_class()
        stored = mem.tensors["x"][: mem.filled, 0].long().tolist()
        got: dict[int, list[int]] = {}
        for i in stored:
            got.setdefault(labels[i], []).append(i)
        assert {c: sorted(v) for c, v in got.items()} == want
        assert mem.counts.tolist() == [len(want.get(c, [])) for c in range(n_classes)]
        assert mem.tensors["y"][: mem.filled].tolist() == [labels[i] for i in stored]
        assert len(set(stored)) == len(stored) <= size
    assert mem.filled == sum(len(v) for v in want.values())


def test_water_fill_equals_taking_from_the_largest_class_one_at_a_time():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        counts = torch.randint(0, 12, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g)
        removals = int(torch.randint(0, int(counts.sum()) + 1, (1,), generator=g))
        loop = counts.tolist()
        for _ in range(removals):
            loop[loop.index(max(loop))] -= 1  # index(): the lowest class among equals
        assert water_fill(counts, removals).tolist() == loop


# ----------------------------------------------------------------------------- one step against the reference code
def _filled(method, stream, n_tasks=2, per_task=40):
    """A method set up on ``stream`` whose memory holds the first ``per_task`` samples of each task,
    offered through its own step (after_step), with logits from a fixed model."""
    model = _model(stream, 1)
    method.setup(model, stream, seed=0)
    for t in range(n_tasks):
        task = stream[t]
        method.before_task(model, task)
        for s in range(0, per_task, 10):
            b = method.training_batch(Batch(task.x_train[s : s + 10], task.y_train[s : s + 10], task.units, None, t))
            logits = model(b.x)
            method.task_loss(b, logits)
            method.loss(b, logits)
            method.after_step(model, b)
    return model


def _step(method, model, batch):
    """The trainer's step up to backward (cl_runner/trainer.py: _forward_backward): loss and gradients."""
    model.zero_grad(set_to_none=True)
    b = method.training_batch(batch)
    logits = model(b.x)
    loss = method.task_loss(b, logits)
    extra = method.loss(b, logits)
    loss = loss + extra if extra is not None else loss
    loss.backward()
    return b, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _literal(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _same(a, b):
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la, lb, rtol=1e-6, atol=1e-7), (la, lb)
    assert all(torch.allclose(ga[k], gb[k], rtol=1e-5, atol=1e-7) for k in ga)


def _draws(method, n, *sizes):
    """The memory indices the method's next draws will take (a copy of its generator)."""
    g = torch.Generator()
    g.set_state(method.generator.get_state())
    return [torch.randperm(n, generator=g)[:s] for s in sizes]


@pytest.mark.parametrize("active", ["all", "seen"])
def test_replay_is_mammoths_er(active):
    """mammoth c66408f models/er.py: CE (mean) over cat(batch, buffer draw of minibatch_size), then the
    batch alone into the reservoir; with replay_batch = --minibatch_size, ``replay`` is that step."""
    stream = _stream("class", 3, f"active_units={active}")
    er = build_method("replay", None, {"buffer_size": 30, "replay_batch": 7})
    model = _filled(er, stream)
    task = stream[2]
    er.before_task(model, task)
    x, y = task.x_train[:10], task.y_train[:10]
    (idx,) = _draws(er, er.filled, 7)
    mem = er.memory
    lo, hi = task.units  # active_units=all: (0, 6) = every unit, mammoth's plain F.cross_entropy
    assert (lo, hi) == ((0, stream.n_outputs) if active == "all" else (0, 6))

    def mammoth():
        inputs, labels = torch.cat([x, mem["x"][idx]]), torch.cat([y, mem["y"][idx]])
        return F.cross_entropy(model(inputs)[:, lo:hi], labels - lo)

    want = _literal(model, mammoth)
    b, *got = _step(er, model, Batch(x, y, task.units, None, 2))
    _same(tuple(got), want)
    er.after_step(model, b)
    assert er.n_seen == 80 + 10


@pytest.mark.parametrize("method", ["der", "derpp"])
@pytest.mark.parametrize("scenario, active", [("class", "all"), ("class", "seen"), ("domain", "seen")])
def test_der_step_is_mammoths(method, scenario, active):
    """mammoth c66408f models/der.py / derpp.py: loss = CE(net(x), y) + α·MSE(net(buf_x), buf_logits)
    [+ β·CE(net(buf_x2), buf_y2)], the draws' memory indices in order; afterwards the batch is
    stored with the logits of that forward, taken before any optimizer step."""
    stream = _stream(scenario, 3, f"active_units={active}")
    opts = {"buffer_size": 30, "replay_batch": 6, "alpha": 0.7, **({"beta": 1.3} if method == "derpp" else {})}
    der = build_method(method, None, opts)
    model = _filled(der, stream)
    mem = der.buffer.tensors
    assert set(mem) == {"x", "y", "task", "logits"} and mem["logits"].shape == (30, stream.n_outputs)
    task = stream[2]
    der.before_task(model, task)
    x, y = task.x_train[:10], task.y_train[:10]
    idx = _draws(der, der.buffer.filled, 6, 6)
    lo, hi = task.units
    seen = stream.eval_units(2, 0)

    def mammoth():
        outputs = model(x)
        loss = F.cross_entropy(outputs[:, lo:hi], y - lo)
        loss = loss + 0.7 * F.mse_loss(model(mem["x"][idx[0]]), mem["logits"][idx[0]])
        if method == "derpp":
            out2 = model(mem["x"][idx[1]])[:, seen[0] : seen[1]]
            loss = loss + 1.3 * F.cross_entropy(out2, mem["y"][idx[1]] - seen[0])
        return loss

    want = _literal(model, mammoth)
    with torch.no_grad():
        before_step = model(x)
    b, *got = _step(der, model, Batch(x, y, task.units, None, 2))
    _same(tuple(got), want)
    with torch.no_grad():  # an optimizer step between the forward and the memory update
        for p in model.parameters():
            p.add_(1.0)
    g = torch.Generator()
    g.set_state(der.generator.get_state())
    der.after_step(model, b)
    draws = torch.rand(10, generator=g, dtype=torch.float64)
    m = torch.arange(80, 90, dtype=torch.float64)
    slot = (draws * (m + 1)).floor().long()
    for i in range(10):  # the last sample that drew a slot owns it
        s = int(slot[i])
        if s < 30 and not (slot[i + 1 :] == s).any():
            assert torch.equal(mem["x"][s], x[i])
            assert torch.allclose(mem["logits"][s], before_step[i], atol=1e-6)


def test_der_memory_empty_and_alpha_zero():
    """No memory term before the memory holds a sample; α = 0 (DER) adds nothing to the gradient."""
    stream = _stream("class", 2)
    der = build_method("der", None, {"buffer_size": 10, "replay_batch": 4, "alpha": 0.0})
    model = _model(stream)
    der.setup(model, stream, seed=0)
    task = stream[0]
    der.before_task(model, task)
    first = Batch(task.x_train[:8], task.y_train[:8], task.units, None, 0)
    assert der.training_batch(first) is first
    logits = model(first.x)
    der.task_loss(first, logits)
    assert der.loss(first, logits) is None
    der.after_step(model, first)
    b, loss, _ = _step(der, model, Batch(task.x_train[8:16], task.y_train[8:16], task.units, None, 0))
    assert len(b) == 12
    lo, hi = task.units
    assert torch.allclose(loss, F.cross_entropy(model(task.x_train[8:16])[:, lo:hi], task.y_train[8:16] - lo))


@pytest.mark.parametrize("task_free", [True, False])
def test_er_ace_step_is_the_authors(task_free):
    """pclucas14/AML methods/er_ace.py (= newest mammoth models/er_ace.py): seen ∪= labels of the batch;
    incoming logits masked_fill(-1e9) outside {present} ∪ [max seen, ∞); plus the plain CE of a memory
    draw. mammoth's task_free=False: plain CE and no replay in the first task."""
    stream = _stream("class", 3, "active_units=all")
    ace = build_method("er_ace", None, {"buffer_size": 25, "replay_batch": 5, "task_free": task_free})
    model = _model(stream, 2)
    ace.setup(model, stream, seed=0)
    seen = torch.zeros(0, dtype=torch.long)
    g = torch.Generator().manual_seed(9)
    for t in range(3):
        task = stream[t]
        ace.before_task(model, task)
        for s in range(0, 40, 8):
            # batches with some of the task's classes only (present ≠ the task's classes)
            keep = task.y_train[:200] == task.y_train[int(torch.randint(200, (1,), generator=g))]
            pick = torch.where(keep if s % 16 else torch.ones_like(keep))[0][s : s + 8]
            x, y = task.x_train[pick], task.y_train[pick]
            present = y.unique()
            seen = torch.cat([seen, present]).unique()
            replay = (task_free or t > 0) and ace.buffer.filled > 0
            (idx,) = _draws(ace, ace.buffer.filled, 5) if replay else (None,)
            mem = ace.buffer.tensors

            def authors(x=x, y=y, present=present, seen=seen, replay=replay, idx=idx, mem=mem, t=t):
                logits = model(x)
                mask = torch.zeros_like(logits)
                mask[:, present] = 1
                mask[:, seen.max() :] = 1
                if t > 0 or task_free:
                    logits = logits.masked_fill(mask == 0, -1e9)
                loss = F.cross_entropy(logits, y)
                if replay:
                    loss = loss + F.cross_entropy(model(mem["x"][idx]), mem["y"][idx])
                return loss

            want = _literal(model, authors)
            b, *got = _step(ace, model, Batch(x, y, task.units, None, t))
            assert len(b) == 8 + (min(5, ace.buffer.filled) if replay else 0)
            _same(tuple(got), want)
            ace.after_step(model, b)
    assert torch.equal(ace.seen.nonzero().squeeze(1), seen)


def test_gdumb_schedule_is_the_authors(monkeypatch):
    """drimpossible/GDumb src/main.py: epoch 0 at 0.1·maxlr, epoch 1 at maxlr, then
    CosineAnnealingWarmRestarts(T_0=1, T_mult=2, eta_min=minlr).step() once per epoch."""
    stream = _stream("class", 2)
    gd = build_method("gdumb", None, {"buffer_size": 20, "fit_epochs": 12, "fit_batch": 8})
    model = _model(stream)
    gd.setup(model, stream, seed=0)
    gd.training_data(stream, 0)
    lrs = []
    step = torch.optim.SGD.step

    def record(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", record)
    gd.fit(0)
    # the authors' loop, on a dummy parameter
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=1, T_mult=2, eta_min=0.0005)
    want = []
    for epoch in range(12):
        if epoch <= 0:
            opt.param_groups[0]["lr"] = 0.05 * 0.1
        elif epoch == 1:
            opt.param_groups[0]["lr"] = 0.05
        else:
            sched.step()
        want += [opt.param_groups[0]["lr"]] * 3  # 20 samples in batches of 8
    assert lrs == want


def test_gdumb_fits_a_fresh_model_and_leaves_the_run_alone():
    stream = _stream("class", 3)
    gd = build_method("gdumb", None, {"buffer_size": 60, "fit_epochs": 20, "fit_batch": 16})
    model = _model(stream)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    gd.setup(model, stream, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # the run's model moves on; the fit still starts from θ_0
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    for t in range(2):
        data = gd.training_data(stream, t)
        assert len(data) == 0  # the trainer trains nothing
    assert gd.buffer.counts.tolist()[:4] == [15, 15, 15, 15] and gd.buffer.filled == 60
    rng = torch.get_rng_state()
    net = gd.evaluator(model, 1)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in moved.items())
    assert net is not model and gd.evaluator(model, 1) is net  # the same memory: no second fit
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], model.parameters(), strict=True))
    x, y = gd.buffer.tensors["x"][:60], gd.buffer.tensors["y"][:60]
    with torch.no_grad():
        assert (net(x)[:, :4].argmax(1) == y).float().mean() > 0.9  # it learned the memory
    again = build_method("gdumb", None, {"buffer_size": 60, "fit_epochs": 20, "fit_batch": 16})
    fresh = _model(stream)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in initial.items())
    again.setup(fresh, stream, seed=0)
    for t in range(2):
        again.training_data(stream, t)
    net2 = again.fit(1)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters(), strict=True))  # deterministic
    assert not torch.equal(next(net.parameters()), initial[next(iter(initial))])


# ----------------------------------------------------------------------------- forgetting
FAST = {
    "der": [*TABLE, "method.replay_batch=10"],
    "derpp": TABLE,
    "er_ace": TABLE,
    "gdumb": ["method.fit_epochs=16", "active_units=all"],
}


@pytest.fixture(scope="module")
def finetune_acc(tmp_path_factory):
    out = {}
    for seed in (0, 1):
        cfg = compose_config("benchmark=split_digits", "scenario=class", "method=finetune", *TABLE, "epochs=3")
        cfg.seed, cfg.device, cfg.threads = seed, "cpu", 1
        with contextlib.redirect_stdout(io.StringIO()):
            out[seed] = run_experiment(cfg, tmp_path_factory.mktemp(f"ft{seed}"))["acc"]
    return out


@pytest.mark.parametrize("method", sorted(FAST))
def test_memory_methods_reduce_forgetting_on_class_il_split_digits(tmp_path, method, finetune_acc, one_thread):
    """Class-IL split digits (5 × 2 classes) in the DER table's S-MNIST setting: finetune keeps the
    last task only (ACC ≈ 20 %); each method keeps the others, by far, for two seeds."""
    for seed in (0, 1):
        cfg = compose_config("benchmark=split_digits", "scenario=class", f"method={method}", *FAST[method], "epochs=3")
        cfg.seed, cfg.device, cfg.threads = seed, "cpu", 1
        with contextlib.redirect_stdout(io.StringIO()):
            acc = run_experiment(cfg, tmp_path / str(seed))["acc"]
        assert acc >= finetune_acc[seed] + 0.25, (method, seed, finetune_acc[seed], acc)


# ----------------------------------------------------------------------------- checkpoints
RESUME = {
    "der": {"buffer_size": 40, "replay_batch": 8},
    "derpp": {"buffer_size": 40, "replay_batch": 8},
    "er_ace": {"buffer_size": 40, "task_free": False},
    "gdumb": {"buffer_size": 40, "fit_epochs": 3},
}


def _trainer(stream, name, seed=0, checkpoint=None):
    model = _model(stream, seed)
    cfg = compose_config("optimizer=sgd", "optimizer.lr=0.05")
    method = build_method(name, None, RESUME[name])
    opt = make_optimizer_factory(cfg.optimizer)
    return Trainer(model, method, stream, opt, batch_size=16, epochs=1, seed=seed, checkpoint=checkpoint)


@pytest.mark.parametrize("scenario", ["task", "class"])
@pytest.mark.parametrize("name", sorted(RESUME))
def test_resume_from_a_weights_only_checkpoint_gives_the_same_matrix(name, scenario, one_thread):
    stream = _stream(scenario, 3, "benchmark.max_train_per_task=120")
    saved = []

    def keep(state):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        saved.append(buffer.getvalue())

    state = torch.get_rng_state(), random.getstate()
    full = _trainer(stream, name, checkpoint=keep).run()
    after_first = torch.load(io.BytesIO(saved[0]), weights_only=True)
    assert after_first["method"]["memory"]["x"].shape[0] == 40
    resumed = _trainer(stream, name).run(resume=after_first)
    assert resumed.matrix == full.matrix  # bitwise
    assert _trainer(stream, name, seed=1).run().matrix != full.matrix
    torch.set_rng_state(state[0])
    random.setstate(state[1])


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "method, key, value",
    [
        ("der", "alpha", -1.0),
        ("der", "alpha", float("inf")),
        ("der", "replay_batch", 0),
        ("derpp", "beta", "x"),
        ("derpp", "buffer_size", 0),
        ("er_ace", "task_free", "yes"),
        ("gdumb", "fit_epochs", 0),
        ("gdumb", "max_lr", 0.0),
        ("gdumb", "momentum", 1.0),
        ("gdumb", "schedule", "cosine"),
        ("gdumb", "clip_grad_norm", -1.0),
        ("gdumb", "min_lr", 1.0),
    ],
)
def test_bad_options_are_one_line(method, key, value):
    with pytest.raises(ValueError, match=f"^method.{key}") as e:
        build_method(method, None, {key: value})
    assert "\n" not in str(e.value)


def test_gdumb_needs_a_slot_per_class():
    stream = _stream("class", 3)
    gd = build_method("gdumb", None, {"buffer_size": 5})
    with pytest.raises(ValueError, match=r"^method.buffer_size=5 is smaller than the stream's 6 output units"):
        gd.setup(_model(stream), stream)
