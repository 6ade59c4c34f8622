"""TensorBoard extras: written with a real SummaryWriter into tmp and read back from the event files."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata
from torch.utils.tensorboard import SummaryWriter

from cl_runner import tb_extras
from cl_runner.tb_extras import (
    accuracy_heatmap,
    custom_scalars_layout,
    write_hparams,
    write_importance_histograms,
)


def _acc(path) -> EventAccumulator:
    acc = EventAccumulator(
        str(path), size_guidance={"scalars": 0, "tensors": 0, "images": 0, "histograms": 0}
    )
    acc.Reload()
    return acc


def _colour_count(img: np.ndarray, colour) -> int:
    return int(np.all(img == np.array(colour, dtype=np.uint8), axis=-1).sum())


def _box_of(img: np.ndarray, colour) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(np.all(img == np.array(colour, dtype=np.uint8), axis=-1))
    return ys.min(), ys.max(), xs.min(), xs.max()


# ----------------------------------------------------------------------------- heatmap
def test_heatmap_is_rgb_uint8_and_grows_with_the_matrix():
    small = accuracy_heatmap([[0.5]], ["a"])
    big = accuracy_heatmap([[0.5] * 4 for _ in range(4)], list("abcd"))
    assert small.dtype == np.uint8 and small.ndim == 3 and small.shape[2] == 3
    assert big.shape[0] > small.shape[0] and big.shape[1] > small.shape[1]


def test_heatmap_cell_colour_follows_accuracy():
    img = accuracy_heatmap([[0.0, 0.5, 1.0]], ["t1", "t2", "t3"])
    low, mid, high = (tb_extras._cell_colour(a) for a in (0.0, 0.5, 1.0))
    assert len({low, mid, high}) == 3
    # the 0.5 and 1.0 cells are filled with their colours (most of a cell, text aside)
    assert _colour_count(img, mid) > 300 and _colour_count(img, high) > 300
    # darker (lower sum of RGB) with higher accuracy: white → blue
    assert sum(low) > sum(mid) > sum(high)
    assert high[2] > high[0]  # blue


def _text_mask(value: float) -> np.ndarray:
    """Pixels of a one-cell heatmap's cell that are not the cell's fill colour: the written value."""
    fill = tb_extras._cell_colour(value)
    img = accuracy_heatmap([[value]], ["t1"])
    y0, y1, x0, x1 = _box_of(img, fill)
    return ~np.all(img[y0 + 1 : y1, x0 + 1 : x1] == np.array(fill, dtype=np.uint8), axis=-1)


def test_heatmap_values_are_written_legibly_in_each_cell():
    """Text pixels inside the cell, at least 10 px tall, and the glyphs change with the value."""
    text = _text_mask(1.0)
    assert text.sum() > 40, "no value written in the cell"
    rows = np.nonzero(text.any(axis=1))[0]
    assert rows.max() - rows.min() + 1 >= 10, "glyphs smaller than 10 px"
    assert _text_mask(0.2).sum() > 40  # dark text on a light cell as well
    a, b = _text_mask(0.973), _text_mask(0.128)  # "97.3" vs "12.8"
    assert a.sum() > 40 and b.sum() > 40
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_heatmap_missing_values_are_grey_and_labels_are_drawn():
    img = accuracy_heatmap([[0.9, None], [0.8, float("nan")]], ["first", "second"])
    assert _colour_count(img, tb_extras._MISSING) > 300
    # a long task name is cut, the image does not grow without bound
    long_img = accuracy_heatmap([[0.5]], ["x" * 500])
    assert long_img.shape[1] < 600


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
        for e, imp in zip(evs, (imp0, imp1)):
            t = imp[per_task].double()
            h = e.histogram_value
            assert h.num == t.numel()
            assert h.min == pytest.approx(t.min().item()) and h.max == pytest.approx(t.max().item())
            assert h.sum == pytest.approx(t.sum().item(), rel=1e-5)


def test_custom_scalars_layout_round_trip_and_regexes(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = custom_scalars_layout(12)
    with SummaryWriter(str(tmp_path)) as w:
        w.add_custom_scalars(layout)
    acc = _acc(tmp_path)
    (ev,) = acc.Tensors("custom_scalars__config__")
    stored = layout_pb2.Layout()
    stored.ParseFromString(ev.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in stored.category for c in cat.chart}
    per_task = charts["per-task accuracy"]
    assert custom_scalars_layout(3) == layout  # identical for every run: merged across a sweep
    metrics = charts["ACC / BWT / FWT / forgetting"]
    train = charts["train loss / penalty"]

    def matched(regexes, tags):  # the plugin uses re.match
        return {t for t in tags if any(re.compile(r).match(t) for r in regexes)}

    tags = [f"acc/task_{j}" for j in range(13)] + ["acc/average_seen", "acc_init/task_1", "acc/task_1x",
                                                    "metrics/acc", "metrics/bwt", "metrics/fwt", "metrics/forgetting",
                                                    "metrics/learning_accuracy", "train/loss", "train/penalty", "hparam/acc"]
    assert matched(per_task, tags) == {f"acc/task_{j}" for j in range(13)} | {"acc/average_seen"}
    assert matched(metrics, tags) == {"metrics/acc", "metrics/bwt", "metrics/fwt", "metrics/forgetting"}
    assert matched(train, tags) == {"train/loss", "train/penalty"}


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
    _, start_a, end_a = _session(_acc(tmp_path / "a"))
    _, start_b, _ = _session(_acc(tmp_path / "b"))
    assert end_a.status == api_pb2.STATUS_FAILURE
    assert start_a.group_name and start_a.group_name != start_b.group_name  # one row per run


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
        allowed_statuses=[api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING],
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


def test_heatmap_stays_legible_with_the_old_bitmap_font(monkeypatch):
    """Pillow < 10.1 (no ``size=``) or no FreeType: bitmap font, image enlarged 2x."""
    from PIL import ImageFont

    original = ImageFont.load_default

    def old_pillow(size=None):
        if size is not None:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return original()

    monkeypatch.setattr(ImageFont, "load_default", old_pillow)
    text = _text_mask(1.0)
    rows = np.nonzero(text.any(axis=1))[0]
    assert text.sum() > 40 and rows.max() - rows.min() + 1 >= 10
