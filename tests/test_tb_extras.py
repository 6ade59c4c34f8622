"""TensorBoard extras: written with a real SummaryWriter into tmp and read back from the event files."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata
from torch.utils.tensorboard import SummaryWriter

from cl_runner.report import tb as tb_extras
from cl_runner.report.tb import accuracy_heatmap, write_hparams, write_importance_histograms


def _acc(path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0, "images": 0, "histograms": 0})
    acc.Reload()
    return acc


# ----------------------------------------------------------------------------- heatmap and curves
CARD_PX = 330  # width of TensorBoard's image card (Images dashboard) in a 1400-px window


def _pixel(img: np.ndarray, fig, ax, x: float, y: float) -> np.ndarray:
    """The RGB pixel of ``img`` (drawn from ``fig``) at data coordinates (x, y) of ``ax``."""
    px, py = ax.transData.transform((x, y))
    return img[int(round(img.shape[0] - py)), int(round(px))].astype(int)


def test_heatmap_cells_are_coloured_by_accuracy_and_hold_their_values():
    import matplotlib

    m = [[0.973, 0.128, 0.5], [0.0, 1.0, None]]
    fig = tb_extras.heatmap_figure(m, ["a", "b", "c"])
    img = tb_extras.figure_to_array(fig)
    ax = fig.axes[0]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["97.3", "12.8", "50.0", "0.0", "100.0", "n/a"]  # percent, row by row
    cmap = matplotlib.colormaps[tb_extras.HEATMAP_CMAP]
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            got = _pixel(img, fig, ax, j - 0.35, i - 0.35)  # a corner of the cell, away from its text
            want = np.array([255, 255, 255]) if v is None else np.round(np.array(cmap(v)[:3]) * 255)
            assert np.abs(got - want).max() <= 3, (i, j, got, want)
    # the colour scale is fixed to 0–100 % and shown as a colour bar
    assert ax.images[0].norm.vmin == 0 and ax.images[0].norm.vmax == 100
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "accuracy %"


@pytest.mark.parametrize("n", [2, 5, 10])
def test_heatmap_values_stay_legible_at_tensorboard_card_size(n):
    """Scaled to the card's width, a cell value is at least 11 px tall up to 6 tasks (whole percents,
    at least 8 px, for 10) and fits inside its cell."""
    fig = tb_extras.heatmap_figure([[0.889] * n for _ in range(n)])
    img = tb_extras.figure_to_array(fig)
    scale = min(1.0, CARD_PX / img.shape[1])
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    cell_w = abs(ax.transData.transform((1, 0))[0] - ax.transData.transform((0, 0))[0])
    for t in ax.texts:
        box = t.get_window_extent(renderer)
        assert box.height * scale >= (11 if n <= 6 else 8), (n, box.height * scale)
        assert box.width < cell_w
    assert ax.texts[0].get_text() == ("88.9" if n <= 6 else "89")


def test_per_task_curves_one_colour_per_task_from_init():
    init = [0.5, 0.4, 0.3]
    m = [[0.9, 0.2, 0.1], [0.7, 0.95, 0.3], [0.6, 0.8, 0.97]]
    fig = tb_extras.curves_figure(m, ["a", "b", "c"], init)
    ax = fig.axes[0]
    solid = [ln for ln in ax.lines if ln.get_linestyle() == "-"]
    assert len(solid) == 3 and len({ln.get_color() for ln in solid}) == 3
    # task j's solid curve starts once it is trained and holds R[i][j] in percent
    for j, ln in enumerate(solid):
        assert list(ln.get_xdata()) == list(range(j + 1, 4))
        assert list(ln.get_ydata()) == pytest.approx([100 * m[i][j] for i in range(j, 3)])
    dotted = {ln.get_color(): ln for ln in ax.lines if ln.get_linestyle() == ":"}
    assert list(dotted[solid[2].get_color()].get_ydata()) == pytest.approx([30.0, 10.0, 30.0, 97.0])  # init, before
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["1", "2", "3"]
    assert tb_extras.accuracy_curves(m, [], init).shape[2] == 3


# ----------------------------------------------------------------------------- through the writer
def test_heatmap_image_and_histograms_in_event_files(tmp_path):
    img = accuracy_heatmap([[0.99, 0.1], [0.7, 0.95]], ["task a", "task b"])
    imp0 = {"body.0.weight": torch.rand(8, 4, dtype=torch.float64), "head.bias": torch.tensor([0.5, 2.0, 3.5])}
    imp1 = {"body.0.weight": torch.rand(8, 4) * 10, "head.bias": torch.tensor([1.0, 1.0, 7.0])}
    with SummaryWriter(str(tmp_path)) as w:
        w.add_image("accuracy_matrix/heatmap", img, 2, dataformats="HWC")
        write_importance_histograms(w, imp0, 1)
        write_importance_histograms(w, imp1, 2)
        write_importance_histograms(w, {"empty": torch.zeros(0)}, 2)
    acc = _acc(tmp_path)
    (ev,) = acc.Images("accuracy_matrix/heatmap")
    assert (ev.height, ev.width, ev.step) == (img.shape[0], img.shape[1], 2)
    decoded = np.asarray(Image.open(io.BytesIO(ev.encoded_image_string)).convert("RGB"))
    assert np.array_equal(decoded, img)  # PNG is lossless: the stored image is ours

    assert set(acc.Tags()["histograms"]) == {"importance/body/0/weight", "importance/head/bias"}
    for tag, per_task in (("importance/body/0/weight", "body.0.weight"), ("importance/head/bias", "head.bias")):
        evs = acc.Histograms(tag)
        assert [e.step for e in evs] == [1, 2]
        for e, imp in zip(evs, (imp0, imp1), strict=True):
            t = imp[per_task].double()
            h = e.histogram_value
            assert h.num == t.numel()
            assert h.min == pytest.approx(t.min().item()) and h.max == pytest.approx(t.max().item())
            assert h.sum == pytest.approx(t.sum().item(), rel=1e-5)


def test_importance_histograms_leave_out_non_finite_values(tmp_path):
    with SummaryWriter(str(tmp_path)) as w:
        write_importance_histograms(
            w,
            {"a.weight": torch.tensor([1.0, float("nan"), 3.0, float("inf")]), "b.bias": torch.tensor([float("nan")])},
            7,
        )
    acc = _acc(tmp_path)
    assert set(acc.Tags()["histograms"]) == {"importance/a/weight"}  # all-NaN: skipped, no crash
    (ev,) = acc.Histograms("importance/a/weight")
    assert ev.step == 7 and ev.histogram_value.num == 2 and ev.histogram_value.max == 3.0


# ----------------------------------------------------------------------------- hparams
def _session(acc: EventAccumulator):
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    return content, start, end


def test_write_hparams_values_types_and_metrics(tmp_path):
    from omegaconf import OmegaConf

    hp = {
        "method": "ewc",
        "lambda": 100,
        "seed": np.int64(3),
        "method.half": True,
        "method.fisher_samples": None,
        "method.gamma": np.float32(0.5),
        "hidden": [400, 400],
        "class_order": OmegaConf.create([1, 0]),
    }
    with SummaryWriter(str(tmp_path)) as w:
        write_hparams(w, hp, {"acc": 0.75, "bwt": -0.125, "fwt": None, "hparam/forgetting": torch.tensor(0.25)})
    acc = _acc(tmp_path)
    content, start, end = _session(acc)
    assert metadata.EXPERIMENT_TAG not in content  # the dashboard builds the experiment from all runs
    h = start.hparams
    assert h["method"].string_value == "ewc"
    assert h["lambda"].number_value == 100.0
    assert h["seed"].number_value == 3.0
    assert h["method.half"].WhichOneof("kind") == "bool_value" and h["method.half"].bool_value is True
    assert h["method.fisher_samples"].string_value == "none"
    assert h["method.gamma"].number_value == pytest.approx(0.5)
    assert h["hidden"].string_value == "[400, 400]"
    assert h["class_order"].string_value == "[1, 0]"
    assert end.status == api_pb2.STATUS_SUCCESS
    scalars = set(acc.Tags()["scalars"])
    assert scalars == {"hparam/acc", "hparam/bwt", "hparam/forgetting"}  # None metric left out
    assert acc.Scalars("hparam/acc")[0].value == pytest.approx(0.75)
    assert acc.Scalars("hparam/bwt")[0].value == pytest.approx(-0.125)
    assert acc.Scalars("hparam/forgetting")[0].value == pytest.approx(0.25)
    # written into the writer's own folder: no sub-folder per call
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []


def test_write_hparams_failure_status_and_group_names(tmp_path):
    with SummaryWriter(str(tmp_path / "a")) as w:
        write_hparams(w, {"method": "si", "seed": 0}, {"acc": 0.5}, status="failed")
    with SummaryWriter(str(tmp_path / "b")) as w:
        write_hparams(w, {"method": "si", "seed": 1}, {"acc": 0.5})
    with SummaryWriter(str(tmp_path / "c")) as w:
        write_hparams(w, {"method": "si", "seed": 1}, {"acc": 0.5}, trial="3_seed=1 (sweep)", step=12)
    _, start_a, end_a = _session(_acc(tmp_path / "a"))
    _, start_b, _ = _session(_acc(tmp_path / "b"))
    _, start_c, _ = _session(_acc(tmp_path / "c"))
    assert end_a.status == api_pb2.STATUS_FAILURE
    assert start_a.group_name and start_a.group_name != start_b.group_name  # one row per run
    assert start_c.group_name == "3_seed=1 (sweep)"  # the trial's readable name
    with SummaryWriter(str(tmp_path / "d")) as w:
        write_hparams(w, {"method": "si"}, {}, status="interrupted")
    assert _session(_acc(tmp_path / "d"))[2].status == api_pb2.STATUS_UNKNOWN  # resumable, not a failure
    assert [(e.step, e.value) for e in _acc(tmp_path / "c").Scalars("hparam/acc")] == [(12, 0.5)]


def _hparams_dashboard(logdir):
    """What TensorBoard's HParams dashboard shows for ``logdir``: the plugin's own backend."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context, get_experiment, list_session_groups

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    tb_ctx = base_plugin.TBContext(
        logdir=str(logdir), data_provider=data_provider.MultiplexerDataProvider(mux, str(logdir)), multiplexer=mux
    )
    ctx, rc = backend_context.Context(tb_ctx), context.RequestContext()
    exp = get_experiment.Handler(rc, ctx, "", api_pb2.GetExperimentRequest()).run()
    req = api_pb2.ListSessionGroupsRequest(
        start_index=0,
        slice_size=1000,
        allowed_statuses=[
            api_pb2.STATUS_UNKNOWN,
            api_pb2.STATUS_SUCCESS,
            api_pb2.STATUS_FAILURE,
            api_pb2.STATUS_RUNNING,
        ],
    )
    groups = list_session_groups.Handler(rc, ctx, "", req).run().session_groups
    return exp, groups


def test_all_runs_of_a_sweep_appear_together_in_the_hparams_dashboard(tmp_path):
    runs = {
        "0_ewc/tb": ({"method": "ewc", "lambda": 1.0, "seed": 0, "method.half": True}, 0.5),
        "1_ewc/tb": ({"method": "ewc", "lambda": 10.0, "seed": 0, "method.half": False}, 0.625),
        "2_si/tb": ({"method": "si", "lambda": 10.0, "seed": 1, "method.xi": 0.1}, 0.75),
    }
    for name, (hp, a) in runs.items():
        with SummaryWriter(str(tmp_path / name)) as w:
            w.add_scalar("acc/task_1", a, 1)
            write_hparams(w, hp, {"acc": a})
    exp, groups = _hparams_dashboard(tmp_path)
    infos = {h.name: h for h in exp.hparam_infos}
    # the union of every run's hyperparameters, with one type each
    assert set(infos) == {"method", "lambda", "seed", "method.half", "method.xi"}
    assert infos["method.half"].type == api_pb2.DATA_TYPE_BOOL
    assert infos["lambda"].type == api_pb2.DATA_TYPE_FLOAT64
    assert {v.string_value for v in infos["method"].domain_discrete.values} == {"ewc", "si"}
    assert "hparam/acc" in {m.name.tag for m in exp.metric_infos}
    sessions = {s.name: s for g in groups for s in g.sessions}
    assert set(sessions) == set(runs)
    for name, (_, a) in runs.items():
        values = {m.name.tag: m.value for m in sessions[name].metric_values}
        assert values["hparam/acc"] == pytest.approx(a)


def test_plain_values():
    assert tb_extras._plain(None) == "none"
    assert tb_extras._plain(np.float64(0.5)) == 0.5 and type(tb_extras._plain(np.float64(0.5))) is float
    assert tb_extras._plain(True) is True
    assert tb_extras._plain({"b": 1, "a": [1, 2]}) == '{"a": [1, 2], "b": 1}'
    assert tb_extras._plain(torch.tensor(2.5)) == 2.5
    assert not math.isnan(tb_extras._metric_value(torch.tensor(0.5)))


# ----------------------------------------------------------------------------- the run's logger
class _FakeMethod:
    def importance(self):
        return {"body.0.weight": torch.ones(3, 2)}


def _log_a_run(run_dir, matrix, initial, steps_per_task, status="ok"):
    """Drive TensorBoardLogger with the trainer's events for a hand-written run."""
    from cl_runner.report.tb import TensorBoardLogger

    tb = TensorBoardLogger(run_dir, len(matrix), trial=None)
    tb.evaluated(-1, initial)
    first = 0
    for t, (row, n) in enumerate(zip(matrix, steps_per_task, strict=True)):
        tb.task_end(t, first, [1.0 / (k + 1) for k in range(n)], [0.1] * n)
        first += n
        tb.consolidated(t, _FakeMethod())
        tb.evaluated(t, row)
    names = [f"task{j}" for j in range(len(matrix))]
    result = {
        "status": status,
        "task_names": names,
        "accuracy_matrix": matrix,
        "initial_accuracy": initial,
        "acc": 0.8,
        "bwt": -0.1,
        "fwt": None,
        "forgetting": 0.1,
        "learning_accuracy": 0.9,
    }
    tb.final(result, {"method": "ewc", "lambda": 10.0, "seed": 0})
    tb.close()


def test_logger_conventions_one_step_axis_percent_final_metrics_once(tmp_path):
    run = tmp_path / "sweep" / "3_lambda=10,method=ewc"
    matrix = [[0.9, 0.2], [0.6, 0.95]]
    initial = [0.5, 0.25]
    _log_a_run(run, matrix, initial, [5, 7])
    main, hp = _acc(run), _acc(run / "hparams")
    scalars = set(main.Tags()["scalars"])
    # one step axis: optimizer steps; step 0 = the initial model, then where each task ended
    for j in range(2):
        events = main.Scalars(f"acc/task_{j + 1}")
        assert [e.step for e in events] == [0, 5, 12]
        assert [e.value for e in events] == pytest.approx([100 * initial[j], 100 * matrix[0][j], 100 * matrix[1][j]])
    assert [e.step for e in main.Scalars("train/loss")] == list(range(12))
    assert [e.value for e in main.Scalars("acc/average_seen")] == pytest.approx([90.0, 77.5])
    assert not any(t.startswith(("acc_init/", "metrics/", "hparam/")) for t in scalars)  # final metrics: once, below
    assert "custom_scalars__config__" not in main.Tags()["tensors"]
    assert [e.step for e in main.Histograms("importance/body/0/weight")] == [5, 12]
    for tag in ("accuracy_matrix/heatmap", "accuracy_matrix/per_task_curves"):
        (ev,) = main.Images(tag)
        assert ev.step == 12 and ev.width <= 500  # small enough for the card
    from tensorboard.util.tensor_util import make_ndarray

    text = make_ndarray(main.Tensors("accuracy_matrix/text_summary")[-1].tensor_proto).item().decode()
    assert "optimizer steps" in text and "T1 at step 5, T2 at step 12" in text and "95.00" in text
    # the final metrics: percent, written once, in their own sub-run with the HParams session
    assert set(hp.Tags()["scalars"]) == {f"hparam/{m}" for m in ("acc", "bwt", "forgetting", "learning_accuracy")}
    assert [(e.step, e.value) for e in hp.Scalars("hparam/acc")] == [(12, pytest.approx(80.0))]
    assert [e.value for e in hp.Scalars("hparam/bwt")] == [pytest.approx(-10.0)]
    _, start, end = _session(hp)
    assert start.group_name == "3_lambda=10,method=ewc (sweep)" and end.status == api_pb2.STATUS_SUCCESS


def test_sweep_dashboard_offers_the_headline_metrics_and_names_runs_by_folder(tmp_path):
    """TensorBoard pointed at a sweep: run names are the job folders (no /tb), the HParams dashboard
    offers exactly the hparam/* metrics (not 20 per-task tags) and names trials by folder."""
    from tensorboard.backend.event_processing import plugin_event_multiplexer

    for k, lam in enumerate((10, 1000)):
        _log_a_run(tmp_path / f"{k}_lambda={lam}", [[0.9, 0.2], [0.6, 0.95]], [0.5, 0.25], [5, 7])
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    assert set(mux.Runs()) == {"0_lambda=10", "0_lambda=10/hparams", "1_lambda=1000", "1_lambda=1000/hparams"}
    exp, groups = _hparams_dashboard(tmp_path)
    assert sorted(m.name.tag for m in exp.metric_infos) == [
        "hparam/acc",
        "hparam/bwt",
        "hparam/forgetting",
        "hparam/learning_accuracy",
    ]
    assert {g.name for g in groups} == {f"0_lambda=10 ({tmp_path.name})", f"1_lambda=1000 ({tmp_path.name})"}
