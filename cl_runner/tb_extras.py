"""TensorBoard extras for a run: accuracy-matrix heatmap, custom-scalars layout, HParams, importance.

The run's logger (``cl_runner/loggers.py``) calls these four functions; each writes with the run's
own ``SummaryWriter`` (its ``tb/`` folder), so pointing TensorBoard at a sweep directory shows every
job of the sweep side by side.

HParams: each run writes a *session* (start info with its hyperparameters, the ``hparam/<metric>``
scalars, end info with the status) and deliberately **no experiment summary**. TensorBoard's HParams
plugin then builds the experiment from all sessions under the log directory: the union of the
hyperparameter names (a method's own options appear as columns; runs without them leave them empty),
a common type per name, and the scalar tags as metrics. ``SummaryWriter.add_hparams`` instead writes
one experiment summary per run and the plugin picks one of them arbitrarily, which hides the
columns of the other methods in a methods × λ sweep (and turns bools into 0/1).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Heatmap colours: white (0 %) → blue (100 %); text switches to white on dark cells.
_LOW = np.array([255.0, 255.0, 255.0])
_HIGH = np.array([8.0, 69.0, 148.0])
_MISSING = (200, 200, 200)
_FONT_PX = 14  # glyph height in pixels (legible at TensorBoard's default image size)
_MAX_LABEL = 24  # task names longer than this are cut (ending in "~") to keep the image narrow

METRIC_TAGS = ["metrics/acc", "metrics/bwt", "metrics/fwt", "metrics/forgetting"]
TRAIN_TAGS = ["train/loss", "train/penalty"]


def _font(size: int = _FONT_PX) -> tuple[ImageFont.ImageFont, int]:
    """(font, upscale factor). Pillow >= 10.1 with FreeType has a scalable default font; older
    Pillow or no FreeType only an ~8-px bitmap font, so the image is then drawn small and
    enlarged 2x (nearest neighbour) to keep the glyphs >= 10 px."""
    try:
        return ImageFont.load_default(size=size), 1
    except (TypeError, ImportError, OSError, AttributeError):
        return ImageFont.load_default(), 2


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def _short(name: str) -> str:
    return name if len(name) <= _MAX_LABEL else name[: _MAX_LABEL - 1] + "~"


def _cell_colour(acc: float) -> tuple[int, int, int]:
    a = min(max(acc, 0.0), 1.0)
    return tuple(int(round(c)) for c in (1.0 - a) * _LOW + a * _HIGH)


def accuracy_heatmap(matrix: list[list[float]], task_names: list[str]) -> np.ndarray:
    """Render the accuracy matrix R as an RGB image (H, W, 3) uint8 for ``add_image(..., "HWC")``.

    ``matrix[i][j]`` = test accuracy on task j after training on task i (a fraction in [0, 1]);
    rows are labelled "after <task i>", columns "<task j>". Each cell holds its value as a
    percentage with one decimal (e.g. "97.3") in a 14-px font; the cell colour goes linearly from
    white (0 %) to dark blue (100 %). Missing values (None/NaN, e.g. tasks not evaluated) are grey
    with "n/a". Rows and columns may differ in number (rectangular matrices are drawn as given).
    """
    rows = [list(r) for r in matrix]
    n_rows = len(rows)
    n_cols = max((len(r) for r in rows), default=0)
    names = [str(n) for n in task_names]
    col_labels = [_short(names[j]) if j < len(names) else f"task {j}" for j in range(n_cols)]
    row_labels = ["after " + (_short(names[i]) if i < len(names) else f"task {i}") for i in range(n_rows)]

    font, scale = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = 6
    cell_w = max([_text_size(probe, "100.0", font)[0]] + [_text_size(probe, c, font)[0] for c in col_labels]) + 2 * pad
    text_h = max(_text_size(probe, "Ag100", font)[1], 10)
    cell_h = text_h + 2 * pad
    corner = "trained \\ tested"
    left = max([_text_size(probe, r, font)[0] for r in row_labels] + [_text_size(probe, corner, font)[0]]) + 2 * pad
    top = cell_h
    width, height = left + n_cols * cell_w + 1, top + n_rows * cell_h + 1

    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)

    def centred(box, text, fill):
        x0, y0, x1, y1 = box
        tw, th = _text_size(draw, text, font)
        bx0, by0, _, _ = draw.textbbox((0, 0), text, font=font)
        draw.text((x0 + (x1 - x0 - tw) / 2 - bx0, y0 + (y1 - y0 - th) / 2 - by0), text, font=font, fill=fill)

    centred((0, 0, left, top), corner, (90, 90, 90))
    for j, label in enumerate(col_labels):
        centred((left + j * cell_w, 0, left + (j + 1) * cell_w, top), label, (0, 0, 0))
    for i, label in enumerate(row_labels):
        x0, y0 = 0, top + i * cell_h
        tw, th = _text_size(draw, label, font)
        bx0, by0, _, _ = draw.textbbox((0, 0), label, font=font)
        draw.text((left - pad - tw - bx0, y0 + (cell_h - th) / 2 - by0), label, font=font, fill=(0, 0, 0))
        for j in range(n_cols):
            v = rows[i][j] if j < len(rows[i]) else None
            box = (left + j * cell_w, y0, left + (j + 1) * cell_w, y0 + cell_h)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                draw.rectangle(box, fill=_MISSING, outline=(255, 255, 255))
                centred(box, "n/a", (0, 0, 0))
                continue
            v = float(v)
            draw.rectangle(box, fill=_cell_colour(v), outline=(255, 255, 255))
            centred(box, f"{100.0 * v:.1f}", (255, 255, 255) if v > 0.55 else (0, 0, 0))
    if scale != 1:
        img = img.resize((width * scale, height * scale), Image.NEAREST)
    return np.asarray(img, dtype=np.uint8).copy()


def custom_scalars_layout(n_tasks: int) -> dict:
    """Layout for ``SummaryWriter.add_custom_scalars``: category "continual learning" with three
    multiline charts: the per-task accuracies (regex ``^acc/task_\\d+$``, one line per task, whatever
    the numbering; plus ``acc/average_seen``), the stream metrics ``metrics/{acc,bwt,fwt,forgetting}``,
    and the training curves ``train/{loss,penalty}``. The layout is the same for every run
    (``n_tasks`` is not needed by the regex): TensorBoard merges identical charts of the runs of a
    sweep into one chart each instead of repeating them per task count."""
    return {
        "continual learning": {
            "per-task accuracy": ["Multiline", [r"^acc/task_\d+$", r"^acc/average_seen$"]],
            "ACC / BWT / FWT / forgetting": ["Multiline", [f"^{t}$" for t in METRIC_TAGS]],
            "train loss / penalty": ["Multiline", [f"^{t}$" for t in TRAIN_TAGS]],
        }
    }


def _plain(value: Any) -> int | float | str | bool:
    """An HParams value: bool/int/float/str as is (numpy scalars unwrapped), None → "none",
    anything else (lists, dicts, OmegaConf containers) → its string form."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return "none"
    if isinstance(value, (bool, int, float, str)):
        return value
    try:  # OmegaConf ListConfig/DictConfig → plain containers so the string reads like YAML/JSON
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # 0-d tensors
        return _plain(value.item())
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, (list, tuple, dict)) else str(value)


def _metric_value(value: Any) -> float:
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


def _hparams_summary(tag: str, plugin_data) -> Any:
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata

    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(plugin_data), tensor=metadata.NULL_TENSOR)
    return summary


def write_hparams(writer, hparams: Mapping[str, Any], metrics: Mapping[str, Any], status: str = "ok") -> None:
    """Record this run as an HParams session in the writer's own folder (what
    ``add_hparams(..., run_name=".")`` does, minus the per-run experiment summary; see the module
    docstring).

    ``hparams`` values are converted with :func:`_plain` (None → "none", lists → JSON string,
    bools stay bools). Each metric is written as the scalar ``hparam/<name>`` at step 0 (a name
    that already starts with ``hparam/`` is kept); a None metric (e.g. FWT of a one-task stream) is
    left out, so the run shows an empty cell. Every run is its own session group (the group name
    is a hash of all its hyperparameters, seed included: the dashboard copies one session's values
    into a group's row, so grouping seeds would show a wrong seed; summary.md has the mean ± std).
    ``status`` "ok" → STATUS_SUCCESS, anything else → STATUS_FAILURE.
    """
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    values = {str(k): _plain(v) for k, v in hparams.items()}
    group_name = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()

    start = plugin_data_pb2.SessionStartInfo(group_name=group_name, start_time_secs=time.time())
    for name in sorted(values):
        v = values[name]
        if isinstance(v, bool):  # before int: bool is an int subclass
            start.hparams[name].bool_value = v
        elif isinstance(v, (int, float)):
            start.hparams[name].number_value = float(v)
        else:
            start.hparams[name].string_value = v
    fw = writer._get_file_writer()
    fw.add_summary(
        _hparams_summary(
            metadata.SESSION_START_INFO_TAG,
            plugin_data_pb2.HParamsPluginData(session_start_info=start, version=metadata.PLUGIN_DATA_VERSION),
        ),
        0,
    )
    for name, value in metrics.items():
        if value is None:
            continue
        tag = name if str(name).startswith("hparam/") else f"hparam/{name}"
        writer.add_scalar(tag, _metric_value(value), 0)
    end = plugin_data_pb2.SessionEndInfo(
        status=api_pb2.STATUS_SUCCESS if status == "ok" else api_pb2.STATUS_FAILURE,
        end_time_secs=time.time(),
    )
    fw.add_summary(
        _hparams_summary(
            metadata.SESSION_END_INFO_TAG,
            plugin_data_pb2.HParamsPluginData(session_end_info=end, version=metadata.PLUGIN_DATA_VERSION),
        ),
        0,
    )
    writer.flush()


def write_importance_histograms(writer, importance: Mapping[str, Any], task: int) -> None:
    """One histogram per parameter tensor of the importance (Fisher diagonal, SI's Ω, MAS's Ω) after
    task ``task``: tag ``importance/<param name with dots as slashes>`` (e.g.
    ``importance/body/0/weight``), step = task index. Values are taken as they are (float64 on
    the CPU); empty tensors are skipped."""
    for name, value in importance.items():
        t = value.detach() if hasattr(value, "detach") else value
        arr = np.asarray(t.float().cpu().numpy() if hasattr(t, "cpu") else t, dtype=np.float64).ravel()
        if arr.size == 0:
            continue
        writer.add_histogram("importance/" + str(name).replace(".", "/"), arr, int(task))
