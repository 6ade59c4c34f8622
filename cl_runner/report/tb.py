"""TensorBoard: the run's logger (:class:`TensorBoardLogger`) and what it writes besides scalars:
accuracy-matrix heatmap and per-task curves (matplotlib), HParams, importance histograms. Every run
writes into its own folder, so pointing TensorBoard at a sweep directory shows its jobs side by side.

HParams: each run writes a *session* (start info with its hyperparameters, the ``hparam/<metric>``
scalars, end info with the status) into its own sub-run ``<run>/hparams`` that holds nothing else,
so the dashboard offers exactly the headline metrics. Deliberately **no experiment summary**: the
plugin then builds it from all sessions under the log directory (the union of the hyperparameter
names, so every method's options are columns). ``SummaryWriter.add_hparams`` writes one per run and
the plugin picks one arbitrarily, hiding the other methods' columns (and turning bools into 0/1).

Figures are drawn with matplotlib's Agg canvas (no pyplot, no display), imported only when a
figure is drawn so that ``cl-run`` start-up does not pay for it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from cl_runner.schema import IDENTITY, METRICS, md_table, pct
from cl_runner.trainer import TrainerEvents

_MAX_LABEL = 18  # task names longer than this are cut (ending in "…") to keep the image narrow
HEATMAP_CMAP = "Blues"


def _short(name: str) -> str:
    return name if len(name) <= _MAX_LABEL else name[: _MAX_LABEL - 1] + "…"


def _figure(width_in: float, height_in: float, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def figure_to_array(fig) -> np.ndarray:
    """RGB image (H, W, 3) uint8 of a matplotlib figure, for ``add_image(..., dataformats="HWC")``."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _as_percent(matrix: Sequence[Sequence[Any]]) -> np.ndarray:
    return 100.0 * np.array(matrix, dtype=float)  # None → NaN; finished rows are all T long


def heatmap_figure(matrix: Sequence[Sequence[Any]], task_names: Sequence[str] = ()):
    """The accuracy matrix R as a matplotlib figure: cell (i, j) = test accuracy (%) on task j after
    training task i, written in the cell; colour scale ``Blues`` fixed to 0–100 % with a colour
    bar; missing values (None/NaN) are left white and marked "n/a". Tasks are numbered 1..T on both
    axes (names would not fit; the Text dashboard and accuracy_matrix.csv have them).

    Sized for TensorBoard's image card (about 330 px wide): the image is kept small with text
    large relative to it (values ≈ 1/30 of the image width for 5 tasks), so that scaled to card
    size the values stay ≥ 11 px; up to 6 tasks one decimal, from 7 on whole percents."""
    values = _as_percent(matrix)
    n_rows, n_cols = values.shape
    n = max(n_rows, n_cols, 1)
    decimals = 1 if n <= 6 else 0
    cell = 0.55 if n <= 6 else max(0.3, 3.6 / n)
    fontsize = 11 if n <= 6 else 9 if n <= 12 else 7
    fig = _figure(1.25 + cell * max(n_cols, 1), 0.75 + cell * max(n_rows, 1))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(values), cmap=HEATMAP_CMAP, vmin=0.0, vmax=100.0, aspect="auto")
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            text, colour = ("n/a", "0.45") if math.isnan(v) else (f"{v:.{decimals}f}", "white" if v > 60 else "black")
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=colour)
    step = 1 if n <= 12 else 2
    ax.set_xticks(range(0, n_cols, step), [str(j + 1) for j in range(0, n_cols, step)], fontsize=10)
    ax.set_yticks(range(0, n_rows, step), [str(i + 1) for i in range(0, n_rows, step)], fontsize=10)
    ax.set_xlabel("tested on task", fontsize=10, labelpad=2)
    ax.set_ylabel("after training task", fontsize=10, labelpad=2)
    ax.tick_params(length=0, pad=2)
    cbar = fig.colorbar(im, ax=ax, fraction=0.08, pad=0.03, ticks=[0, 50, 100])
    cbar.ax.tick_params(labelsize=9, length=2, pad=1)
    cbar.set_label("accuracy %", fontsize=9, labelpad=1)
    fig.tight_layout(pad=0.25)
    return fig


def accuracy_heatmap(matrix: Sequence[Sequence[Any]], task_names: Sequence[str] = ()) -> np.ndarray:
    """:func:`heatmap_figure` as an RGB image (H, W, 3) uint8 for ``add_image(..., "HWC")``.
    ``matrix[i][j]`` is a fraction in [0, 1] (or None/NaN when missing); rectangular is fine."""
    return figure_to_array(heatmap_figure(matrix, task_names))


def curves_figure(
    matrix: Sequence[Sequence[Any]], task_names: Sequence[str] = (), initial: Sequence[Any] | None = None
):
    """Per-task accuracy curves: x = tasks trained (0 = the initial model, when ``initial`` is
    given), y = test accuracy (%) on task j, one colour per task (legend "task": 1..T), solid from
    the point where task j has been trained, dotted before. The classic continual-learning plot of
    one run, without TensorBoard's smoothing; sized, like the heatmap, for TensorBoard's card."""
    values = _as_percent(matrix)
    n_rows, n_cols = values.shape
    xs = np.arange(1, n_rows + 1)
    if initial is not None:
        values = np.vstack([_as_percent([initial])[:, :n_cols], values])
        xs = np.arange(0, n_rows + 1)
    fig = _figure(3.8, 2.9)
    ax = fig.add_subplot()
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n_cols <= 10 else "tab20"]
    for j in range(n_cols):
        colour = cmap(j % cmap.N)
        y = values[:, j]
        trained = xs >= j + 1  # from the row where task j has been trained
        ax.plot(xs[trained], y[trained], "-o", color=colour, label=str(j + 1), markersize=3.5, linewidth=1.8)
        before = xs <= j + 1
        if before.sum() > 1:
            ax.plot(xs[before], y[before], ":", color=colour, linewidth=1.0)
    step = 1 if len(xs) <= 12 else 2
    ax.set_xticks(xs[::step], ["init" if x == 0 else str(x) for x in xs[::step]], fontsize=10)
    ax.tick_params(axis="y", labelsize=10)
    ax.set_xlabel("tasks trained", fontsize=10, labelpad=1)
    ax.set_ylabel("accuracy on task (%)", fontsize=10, labelpad=1)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(
        title="task",
        title_fontsize=10,
        fontsize=10,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=min(n_cols, 10),
        frameon=False,
        handlelength=1.0,
        columnspacing=0.6,
        handletextpad=0.3,
        borderaxespad=0.2,
    )
    fig.tight_layout(pad=0.3)
    return fig


def accuracy_curves(
    matrix: Sequence[Sequence[Any]], task_names: Sequence[str] = (), initial: Sequence[Any] | None = None
) -> np.ndarray:
    """:func:`curves_figure` as an RGB image (H, W, 3) uint8."""
    return figure_to_array(curves_figure(matrix, task_names, initial))


_TRADEOFF_PANELS = (("acc", "ACC (%)"), ("bwt", "BWT (%)"), ("learning_accuracy", "learning accuracy (%)"))


def _lambda_axes(axes: Sequence[Any], lams: list[float]) -> None:
    """λ axes, logarithmic; ``symlog`` when λ = 0 is among the values (linear between 0 and the
    smallest positive λ), so 0 sits at the left edge instead of being dropped."""
    positive = [x for x in lams if x > 0]
    for ax, (_, title) in zip(axes, _TRADEOFF_PANELS, strict=True):
        if 0.0 in lams and positive:
            ax.set_xscale("symlog", linthresh=positive[0], linscale=1.0)
            ax.set_xlim(-0.25 * positive[0], positive[-1] * 1.6)
        elif positive:
            ax.set_xscale("log")
        ax.set_xticks(lams, [f"{lam:g}" for lam in lams], fontsize=9)  # exactly the swept values
        ax.minorticks_off()
        ax.set_xlabel("λ (log scale" + (", 0 at the left)" if 0.0 in lams and positive else ")"))
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].axhline(0.0, color="0.5", linewidth=0.8)


def tradeoff_figure(
    series: Mapping[str, Sequence[tuple[float, Mapping[str, tuple[float, float]]]]],
    references: Mapping[str, Mapping[str, tuple[float, float]]],
    n_seeds: int = 1,
    where: str = "",
    vertical: bool = False,
):
    """ACC, BWT and learning accuracy against λ, one panel each, one line per series (method and
    other swept settings) with a ± std band when there are several seeds; methods without λ
    (finetune, joint) as dashed horizontal lines. x axis logarithmic; when λ = 0 is among the values
    it is ``symlog``: linear between 0 and the smallest positive λ, logarithmic above, so 0 sits at
    the left edge instead of being dropped. ``series``/``references`` as built by
    ``cl_runner.report.summary.tradeoff_data`` (percent). ``vertical``: the panels stacked in a narrow
    figure, legible at TensorBoard's card size (the sweep folder's PNG has them side by side)."""
    import matplotlib

    lams = sorted({lam for points in series.values() for lam, _ in points})
    fig = _figure(4.6, 10.0) if vertical else _figure(13.5, 4.4)
    axes = fig.subplots(3, 1) if vertical else fig.subplots(1, 3)
    colours = matplotlib.colormaps["tab10"]
    for k, (label, points) in enumerate(series.items()):
        colour = colours(k % 10)
        for ax, (metric, _) in zip(axes, _TRADEOFF_PANELS, strict=True):
            pts = [(lam, st[metric]) for lam, st in points if metric in st]
            if not pts:
                continue
            x = np.array([p[0] for p in pts])
            mean = np.array([p[1][0] for p in pts])
            std = np.array([p[1][1] for p in pts])
            ax.plot(x, mean, "-o", color=colour, label=label, markersize=4, linewidth=1.8)
            if n_seeds > 1:
                ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.18, linewidth=0)
    for k, (label, st) in enumerate(references.items()):
        colour = colours((len(series) + k) % 10)
        for ax, (metric, _) in zip(axes, _TRADEOFF_PANELS, strict=True):
            if metric in st:
                mean, std = st[metric]
                ax.axhline(mean, color=colour, linestyle="--", linewidth=1.4, label=f"{label} (no λ)")
                if n_seeds > 1 and std > 0:
                    ax.axhspan(mean - std, mean + std, color=colour, alpha=0.10, linewidth=0)
    _lambda_axes(axes, lams)
    handles, labels = axes[0].get_legend_handles_labels()
    per_row = 2 if vertical else 4
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), per_row), fontsize=9, frameon=False)
    spread = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    where = f" — {where}" if where else ""
    fig.suptitle(
        f"Trade-off against λ{where}\n({spread})" if vertical else f"Trade-off against λ{where} ({spread})",
        fontsize=11 if vertical else 12,
    )
    legend_h = math.ceil(len(labels) / per_row) * (0.022 if vertical else 0.045)
    fig.tight_layout(rect=(0, 0.02 + legend_h, 1, 1), h_pad=1.2)
    return fig


def _plain(value: Any) -> int | float | str | bool:
    """An HParams value: bool/int/float/str as is (numpy scalars and 0-d tensors unwrapped), None →
    "none", containers (also OmegaConf's) → JSON, anything else → its string form."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if getattr(value, "ndim", None) == 0:
        value = value.item()
    if value is None:
        return "none"
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, (list, tuple, dict)) else str(value)


def _metric_value(value: Any) -> float:
    return float(value)  # also numpy scalars and 0-d tensors


def _session_info(tag: str, **info: Any):
    """A Summary holding one HParams session message (start or end)."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **info)
    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)
    return summary


def write_hparams(
    writer,
    hparams: Mapping[str, Any],
    metrics: Mapping[str, Any],
    status: str = "ok",
    trial: str | None = None,
    step: int = 0,
) -> None:
    """Record this run as an HParams session in the writer's folder (``add_hparams(..., run_name=".")``
    minus the experiment summary; see the module docstring). Values through :func:`_plain`; each
    metric once, as the scalar ``hparam/<name>`` at ``step``, a None metric left out (an empty cell).
    Every run is its own session group named ``trial`` (the logger passes the run's folder name;
    default: a hash of the hyperparameters): grouping seeds would show one session's seed for all.
    ``status`` ok → SUCCESS, failed/diverged → FAILURE, others (resumable) → UNKNOWN."""
    import hashlib

    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    values = {str(k): _plain(v) for k, v in hparams.items()}
    group_name = trial or hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()

    start = plugin_data_pb2.SessionStartInfo(group_name=group_name, start_time_secs=time.time())
    for name in sorted(values):
        v = values[name]
        if isinstance(v, bool):  # before int: bool is an int subclass
            start.hparams[name].bool_value = v
        elif isinstance(v, (int, float)):
            start.hparams[name].number_value = float(v)
        else:
            start.hparams[name].string_value = v
    writer.file_writer.add_summary(_session_info(metadata.SESSION_START_INFO_TAG, session_start_info=start), 0)
    for name, value in metrics.items():
        if value is None:
            continue
        tag = name if str(name).startswith("hparam/") else f"hparam/{name}"
        writer.add_scalar(tag, _metric_value(value), step)
    code = {"ok": api_pb2.STATUS_SUCCESS, "failed": api_pb2.STATUS_FAILURE, "diverged": api_pb2.STATUS_FAILURE}
    end = plugin_data_pb2.SessionEndInfo(status=code.get(status, api_pb2.STATUS_UNKNOWN), end_time_secs=time.time())
    writer.file_writer.add_summary(_session_info(metadata.SESSION_END_INFO_TAG, session_end_info=end), 0)
    writer.flush()


def write_importance_histograms(writer, importance: Mapping[str, Any], step: int) -> None:
    """One histogram per parameter tensor of the importance (Fisher diagonal, SI's Ω, MAS's Ω):
    tag ``importance/<param name with dots as slashes>`` (e.g. ``importance/body/0/weight``) at
    ``step`` (the logger passes the optimizer step at which the task ended). Values are taken as
    they are (float64 on the CPU); non-finite entries are left out (TensorBoard refuses a histogram
    of NaNs; a diverged run is reported by the trainer), empty tensors are skipped."""
    for name, value in importance.items():
        t = value.detach() if hasattr(value, "detach") else value
        arr = np.asarray(t.float().cpu().numpy() if hasattr(t, "cpu") else t, dtype=np.float64).ravel()
        arr = arr[np.isfinite(arr)]
        if arr.size == 0:
            continue
        writer.add_histogram("importance/" + str(name).replace(".", "/"), arr, int(step))


def matrix_markdown(matrix: Sequence[Sequence[float]], names: Sequence[str], initial: Sequence[float]) -> str:
    """The accuracy matrix as a markdown table (percent): rows = the initial model, after training task i."""
    rows = [["init", *map(pct, initial)]] + [[f"T{i + 1}", *map(pct, r)] for i, r in enumerate(matrix)]
    return md_table(["after \\ on", *(f"T{j + 1} {n}" for j, n in enumerate(names))], rows)


def run_hparams(ident: Mapping[str, Any], strength: float | None, cfg: Any) -> dict[str, Any]:
    """The HParams record of a run: its identity but the experiment, λ (None for a method without
    one), the method's options as ``method.<key>``, and the training length and learning rate."""
    hparams = {k: ident[k] for k in IDENTITY if k != "experiment"} | {"lambda": strength}
    hparams |= {f"method.{k}": v for k, v in ident["method_options"].items()}
    keys = ("epochs", "iterations", "batch_size")
    return hparams | {"lr": cfg.optimizer.lr} | {k: cfg[k] for k in keys}


class TensorBoardLogger(TrainerEvents):
    """A run's TensorBoard events, written into the run folder itself (so that TensorBoard names the
    run after the folder, e.g. ``3_lambda=10,method=ewc``) and its HParams session into the sub-run
    ``<run>/hparams``.

    Conventions (README, "Outputs and TensorBoard"): the step of every event is the number of
    optimizer steps taken since the start of the run (``acc/task_<j>`` at step 0 = the initial
    model, then at the step where each task ended); accuracies and metrics are in percent;
    ``train/loss`` and ``train/penalty`` (λ·penalty) are per optimizer step. The final metrics are
    written once, as ``hparam/<metric>`` in ``<run>/hparams``.
    """

    def __init__(
        self, log_dir: Path, n_tasks: int, log_every: int = 1, trial: str | None = None, purge_step: int | None = None
    ):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        # purge_step (a resumed run: the optimizer step of its checkpoint + 1) hides the events an
        # earlier, interrupted attempt wrote after its checkpoint, so curves are not drawn twice
        self._writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        # events are held until commit() (at each checkpoint, and at the end): after a kill -9 the event
        # files hold exactly what the checkpoint holds. (Handed to the writer at once, events reached the
        # files whenever its queue or file buffer filled: a task's first loss, logged at the step of the
        # checkpoint before it, then survived a kill -9 after that task and appeared twice on resume.)
        self.writer = _Held(self._writer)
        self.log_every = max(1, int(log_every))
        self.trial = trial or f"{self.log_dir.name} ({self.log_dir.parent.name})"
        self.step = max(0, (purge_step or 1) - 1)  # optimizer steps taken so far
        self.task_end_steps: list[int] = []

    def task_end(self, t: int, first_step: int, losses: list[float], penalties: list[float]) -> None:
        for k in range(0, len(losses), self.log_every):
            self.writer.add_scalar("train/loss", losses[k], first_step + k)
            self.writer.add_scalar("train/penalty", penalties[k], first_step + k)
        self.step = first_step + len(losses)
        self.task_end_steps.append(self.step)

    def evaluated(self, trained: int, row: list[float]) -> None:
        step = 0 if trained < 0 else self.step
        for j, a in enumerate(row):
            self.writer.add_scalar(f"acc/task_{j + 1}", 100.0 * a, step)
        if trained >= 0:
            self.writer.add_scalar("acc/average_seen", 100.0 * sum(row[: trained + 1]) / (trained + 1), step)

    def epoch_evaluated(self, t: int, epoch: int, step: int, accs: list[float], losses: list[float]) -> None:
        for j, (a, loss) in enumerate(zip(accs, losses, strict=True)):
            self.writer.add_scalar(f"epoch/acc_task_{j + 1}", 100.0 * a, step)
            self.writer.add_scalar(f"epoch/loss_task_{j + 1}", loss, step)

    def consolidated(self, t: int, method: Any) -> None:
        importance = method.importance()
        if importance:
            write_importance_histograms(self.writer, importance, self.step)
        for tag, image in getattr(method, "curvature_images", dict)().items():  # (H, W) in [0, 1]
            self.writer.add_image(tag, image.detach().float().cpu(), self.step, dataformats="HW")

    def _hparams(self, hparams: dict[str, Any], metrics: dict[str, Any], status: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(self.log_dir / "hparams")) as w:
            write_hparams(w, hparams, metrics, status=status, trial=self.trial, step=self.step)

    def final(self, result: dict[str, Any], hparams: dict[str, Any], figures: bool = True) -> None:
        names, matrix, initial = result["task_names"], result["accuracy_matrix"], result["initial_accuracy"]
        ends = ", ".join(f"T{i + 1} at step {s}" for i, s in enumerate(self.task_end_steps)) or "none"
        note = "Accuracies in %. Step axis = optimizer steps since the start of the run: step 0 = the initial model"
        self.writer.add_text(
            "accuracy_matrix",
            f"{matrix_markdown(matrix, names, initial)}\n\n{note}; tasks ended at: {ends}.",
            self.step,
        )
        if matrix and figures:
            for tag, image in (
                ("heatmap", accuracy_heatmap(matrix, names)),
                ("per_task_curves", accuracy_curves(matrix, names, initial)),
            ):
                self.writer.add_image(f"accuracy_matrix/{tag}", image, self.step, dataformats="HWC")
        metrics = {k: 100.0 * result[k] for k in METRICS if result.get(k) is not None}
        self._hparams(hparams, metrics, result.get("status", "ok"))

    def failed(self, hparams: dict[str, Any], status: str = "failed") -> None:
        self._hparams(hparams, {}, status)

    def commit(self) -> None:
        """Hand the held events to the event file and flush it (before a checkpoint is saved)."""
        self.writer.commit()
        self._writer.flush()

    def close(self) -> None:
        self.writer.commit()
        self._writer.close()


class _Held:
    """A SummaryWriter's ``add_*`` calls, held until :meth:`commit` replays them in order."""

    def __init__(self, writer: Any):
        self._target, self._calls = writer, []

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("add_"):
            return getattr(self._target, name)

        def held(*args: Any, **kwargs: Any) -> None:
            self._calls.append((name, args, kwargs))

        return held

    def commit(self) -> None:
        calls, self._calls = self._calls, []
        for name, args, kwargs in calls:
            getattr(self._target, name)(*args, **kwargs)
