"""Training curves as PNG files, drawn with matplotlib from a run's log rows (the dicts of its log.jsonl), so
a training loop only calls one function:

    plot_training(rows, "run/loss.png")      pre-training and SFT: train/val loss, learning rate, gradient norm,
                                             tokens/s
    plot_rl(rows, "rl/rl.png")               GRPO: reward, accuracy (sampled and held-out greedy), KL, completion
                                             length
    (both)                                   and a panel of the --eval-task metrics (mc/acc, bpb/bpb, ...) when the
                                             rows have them (task_metric_keys), +- their standard error
    plot_reward_model(rows, "rm/loss.png")   reward model: Bradley-Terry loss, preference accuracy
    plot_stage(kind, rows, "run/")           the one of the three for a stage of fastllm.train.fit (how it draws)
    plot_run("run/")                         the same from a run folder's log.jsonl

`training_figure`, `rl_figure` and `reward_model_figure` return the matplotlib Figure instead (to show or
restyle it).

Figures are drawn on matplotlib's Agg canvas (no display, and no global pyplot state, so this is safe in
notebooks and threads) and written atomically. Noisy per-step series are drawn faintly with a smoothed line on
top (a local straight-line fit, which does not lag behind a falling loss as a moving average does); evaluations
(val loss, held-out accuracy) are drawn as dots.

>>> plot_training([{"step": 0, "loss": 8.3, "lr": 1e-4, "grad_norm": 2.0, "tok_per_s": 9000.0},
...                {"step": 0, "val_loss": 8.2}], "loss.png")
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .fileio import atomic_write

TRAIN_COLOR, VAL_COLOR = "tab:blue", "tab:orange"
TASK_COLORS = (VAL_COLOR, "tab:green", "tab:red", "tab:purple")
# the --eval-task metrics a figure draws ("<task>/<metric>" in log rows; also pass@k); the rest are counts or stderr
TASK_METRICS = ("acc", "acc_norm", "bpb", "exact_match")


def plot_training(rows: list[dict], path: str | os.PathLike, log_scale: bool = False, title: str | None = None) -> None:
    """loss.png of pre-training or SFT: train loss (raw and smoothed) and val loss; learning rate; gradient norm
    (before clipping); tokens/s. log_scale: the loss axis is logarithmic."""
    _save(training_figure(rows, log_scale, title), path)


def training_figure(rows: list[dict], log_scale: bool = False, title: str | None = None):
    """The matplotlib Figure that plot_training writes."""
    tasks = task_metric_keys(rows)
    fig, (loss, lr, norm, speed, *task) = _figure(title or "training", 4 + bool(tasks))
    _noisy(loss, rows, "loss", "train", TRAIN_COLOR)
    _dots(loss, rows, "val_loss", "validation", VAL_COLOR)
    _style(loss, "loss", "cross-entropy (nats/token)", log=log_scale, legend=True)
    _line(lr, rows, "lr", TRAIN_COLOR)
    _style(lr, "learning rate", "learning rate")
    _noisy(norm, rows, "grad_norm", "grad norm", TRAIN_COLOR)
    _style(norm, "gradient norm (before clipping)", "global L2 norm", log=True)
    _noisy(speed, rows, "tok_per_s", "tokens/s", TRAIN_COLOR)
    _style(speed, "throughput", "tokens/s")
    _task_panel(task, rows, tasks)
    return _xlabel(fig, "step")


def plot_rl(rows: list[dict], path: str | os.PathLike, title: str | None = None) -> None:
    """The GRPO run's curves: mean reward (+- one std over the step's completions), accuracy of the sampled
    completions and greedy held-out accuracy, KL to the reference, mean completion length."""
    _save(rl_figure(rows, title), path)


def rl_figure(rows: list[dict], title: str | None = None):
    """The matplotlib Figure that plot_rl writes."""
    tasks = task_metric_keys(rows)
    fig, (reward, acc, kl, length, *task) = _figure(title or "GRPO", 4 + bool(tasks))
    s, r = _series(rows, "reward")
    s_std, std = _series(rows, "reward_std")
    if len(s) and len(s_std) == len(s):
        reward.fill_between(s, r - std, r + std, color=TRAIN_COLOR, alpha=0.12, linewidth=0, label="+- 1 std")
    _noisy(reward, rows, "reward", "mean reward", TRAIN_COLOR)
    _style(reward, "reward", "reward per completion", legend=True)
    _noisy(acc, rows, "accuracy", "sampled completions", TRAIN_COLOR)
    _dots(acc, rows, "eval_accuracy", "held-out prompts, greedy", VAL_COLOR)
    _style(acc, "accuracy", "fraction correct", legend=True)
    acc.set_ylim(-0.03, 1.03)
    _noisy(kl, rows, "kl", "KL", TRAIN_COLOR)
    _style(kl, "KL to the reference policy", "nats/token (k3 estimate)")
    _noisy(length, rows, "completion_len", "tokens", TRAIN_COLOR)
    _style(length, "completion length", "tokens (mean)")
    _task_panel(task, rows, tasks)
    return _xlabel(fig, "GRPO step")


def plot_reward_model(rows: list[dict], path: str | os.PathLike, title: str | None = None) -> None:
    """The reward model's curves: Bradley-Terry loss per step; preference accuracy of the training batches and
    of the held-out pairs."""
    _save(reward_model_figure(rows, title), path)


def reward_model_figure(rows: list[dict], title: str | None = None):
    """The matplotlib Figure that plot_reward_model writes."""
    fig, (loss, acc) = _figure(title or "reward model", 2)
    _noisy(loss, rows, "loss", "train", TRAIN_COLOR)
    _style(loss, "loss", "-log sigmoid(r_chosen - r_rejected)", legend=True)
    _noisy(acc, rows, "accuracy", "train batches", TRAIN_COLOR)
    _dots(acc, rows, "val_accuracy", "held-out pairs", VAL_COLOR)
    _style(acc, "preference accuracy", "fraction with r_chosen > r_rejected", legend=True)
    acc.set_ylim(-0.03, 1.03)
    return _xlabel(fig, "step")


def dpo_figure(rows: list[dict], title: str | None = None):
    """The matplotlib Figure of a DPO run (fastllm.dpo): its loss, the implicit rewards' margin and the preference
    accuracy, per step on the training batches and on the held-out pairs."""
    fig, (loss, margin, acc) = _figure(title or "DPO", 3)
    for ax, key, label, what in ((loss, "loss", "loss", "DPO loss"),
                                 (margin, "margin", "reward margin", "beta * (log-ratio chosen - rejected)"),
                                 (acc, "accuracy", "preference accuracy", "fraction with chosen reward higher")):
        _noisy(ax, rows, key, "train batches", TRAIN_COLOR)
        _dots(ax, rows, "val_" + key, "held-out pairs", VAL_COLOR)
        _style(ax, label, what, legend=True)
    acc.set_ylim(-0.03, 1.03)
    return _xlabel(fig, "step")


def figure_path(kind: str, run: str | os.PathLike) -> Path:
    """Where plot_stage draws the figure of a `kind` run in folder `run`: rl.png for GRPO, else loss.png."""
    return Path(run) / ("rl.png" if kind == "grpo" else "loss.png")


def plot_stage(kind: str, rows: list[dict], run: str | os.PathLike, log_scale: bool = False,
               path: str | os.PathLike | None = None) -> Path:
    """The figure of a run of a training stage (fastllm.train.Stage.kind) in its folder `run`: "grpo" ->
    rl.png (plot_rl), "reward-model" -> loss.png (plot_reward_model), "dpo" -> loss.png (dpo_figure), pre-training
    and SFT (any other kind) ->
    loss.png (plot_training, log_scale for the loss panel); `path` instead if given. Returns the path written."""
    run = Path(run)
    out = Path(path or figure_path(kind, run))
    if kind == "grpo":
        plot_rl(rows, out, title=str(run))
    elif kind == "reward-model":
        plot_reward_model(rows, out, title=str(run))
    elif kind == "dpo":
        _save(dpo_figure(rows, str(run)), out)
    else:
        plot_training(rows, out, log_scale=log_scale, title=str(run))
    return out


def plot_run(run: str | os.PathLike, path: str | os.PathLike | None = None, log_scale: bool = False) -> Path:
    """Re-draw the figure of a run folder from its log.jsonl, as the run drew it (see plot_stage; the stage is
    told by the logged keys: rewards for GRPO, reward margins for DPO, preference accuracy for a reward model);
    returns the path."""
    rows = read_log(Path(run) / "log.jsonl")
    keys = set().union(*rows)
    kind = "grpo" if "reward" in keys else "dpo" if "margin" in keys else \
        "reward-model" if keys & {"accuracy", "val_accuracy"} else "train"
    return plot_stage(kind, rows, run, log_scale, path)


def read_log(path: str | os.PathLike) -> list[dict]:
    """The rows of a log.jsonl (a last line cut by a kill is skipped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def task_metric_keys(rows: list[dict]) -> list[str]:
    """The --eval-task metrics in log rows that a figure draws, in the order first logged: "<task>/<metric>" keys
    whose metric is one of TASK_METRICS or pass@k (not their _stderr, nor bpb's token and byte counts).

    >>> task_metric_keys([{"step": 0, "mc/acc": 0.3, "mc/acc_stderr": 0.05, "mc/acc_norm": 0.31}])
    ['mc/acc', 'mc/acc_norm']
    """
    keys: dict[str, None] = {}
    for r in rows:
        for k in r:
            metric = k.rpartition("/")[2]
            if "/" in k and (metric in TASK_METRICS or (metric.startswith("pass@") and not metric.endswith("_stderr"))):
                keys[k] = None
    return list(keys)


def _task_panel(axes: list, rows: list[dict], keys: list[str]) -> None:
    """The --eval-task metrics as dots (they are evaluations), each in a band of +- its standard error."""
    if not axes:
        return
    ax = axes[0]
    for key, color in zip(keys, TASK_COLORS * len(keys)):
        s, v = _series(rows, key)
        _, se = _series([{"step": r["step"], key: r.get(key + "_stderr", math.nan)} for r in rows
                         if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])], key)
        if len(s) and len(se) == len(v):  # every point has a finite stderr
            ax.fill_between(s, v - se, v + se, color=color, alpha=0.15, linewidth=0)
        _dots(ax, rows, key, key, color)
    metrics = {k.rpartition("/")[2] for k in keys}
    fraction = "bpb" not in metrics  # accuracies, exact match, pass@k
    ylabel = "fraction correct" if fraction else "bits per byte" if metrics == {"bpb"} else "metric"
    _style(ax, "evaluation: " + ", ".join(dict.fromkeys(k.rpartition("/")[0] for k in keys)), ylabel, legend=True)
    if fraction:
        ax.set_ylim(-0.03, 1.03)


# ---- helpers -------------------------------------------------------------------------------------------------


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that have a finite `key`."""
    pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    a = np.array(pts, np.float64).reshape(-1, 2)
    return a[:, 0], a[:, 1]


def smooth(values, half: int) -> np.ndarray:
    """Each point replaced by a straight line fitted (least squares) to the points within `half` places of it
    (fewer at the ends), evaluated there. Unlike a moving average it does not lag behind a falling loss and it
    keeps a straight trend exactly, also at the ends.

    >>> smooth([1.0, 2.0, 3.0, 4.0], 1).tolist()
    [1.0, 2.0, 3.0, 4.0]
    """
    y = np.asarray(values, np.float64)
    n = y.size
    x = (np.arange(n) - n / 2) / max(n, 1)  # O(1) coordinates: the sums below stay well conditioned

    def window_sums(a: np.ndarray) -> np.ndarray:
        c = np.concatenate([[0.0], np.cumsum(a)])
        return c[hi] - c[lo]

    lo, hi = np.maximum(np.arange(n) - half, 0), np.minimum(np.arange(n) + half + 1, n)
    k, sx, sy, sxx, sxy = (window_sums(a) for a in (np.ones(n), x, y, x * x, x * y))
    den = k * sxx - sx * sx
    slope = np.divide(k * sxy - sx * sy, den, out=np.zeros(n), where=den > 1e-12 * k * k)
    return (sy - slope * sx) / k + slope * x


def _figure(title: str, panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = 2
    rows = (panels + 1) // cols
    fig = Figure(figsize=(12, 4.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[panels:]:  # an odd number of panels: no empty frame in the last row
        fig.delaxes(ax)
    fig.suptitle(title, fontsize=13)
    return fig, axes[:panels]


def _line(ax, rows: list[dict], key: str, color: str) -> None:
    s, v = _series(rows, key)
    if len(s):
        ax.plot(s, v, color=color, linewidth=1.6)


def _noisy(ax, rows: list[dict], key: str, label: str, color: str) -> None:
    """A per-step series: faint raw values and, from 20 points on, a smoothed line (windows of ~1/25 of the run)."""
    s, v = _series(rows, key)
    if len(s) == 0:
        return
    if len(s) < 20:
        ax.plot(s, v, color=color, linewidth=1.6, label=label, marker="." if len(s) < 5 else None)
        return
    ax.plot(s, v, color=color, linewidth=0.8, alpha=0.3)
    ax.plot(s, smooth(v, max(3, len(v) // 50)), color=color, linewidth=1.8, label=f"{label} (smoothed)")


def _dots(ax, rows: list[dict], key: str, label: str, color: str) -> None:
    s, v = _series(rows, key)
    if len(s):
        ax.plot(s, v, color=color, linewidth=1.4, marker="o", markersize=4, label=label)


def _style(ax, title: str, ylabel: str, log: bool = False, legend: bool = False) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True, steps=[1, 2, 2.5, 5, 10]))
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}")
    if not ax.lines:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    elif log and all((np.asarray(ln.get_ydata()) > 0).all() for ln in ax.lines):
        ys = np.concatenate([np.asarray(ln.get_ydata(), np.float64) for ln in ax.lines])
        decades = math.log10(ys.max() / ys.min())
        ax.set_yscale("log")  # ticks at 1, 2, ..., 9 x 10^k within a decade, else at 1, 2, 5 x 10^k
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=range(1, 10) if decades < 1.2 else (1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(plain)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=9)


def _xlabel(fig, xlabel: str):
    for ax in fig.axes:
        ax.set_xlabel(xlabel)
    return fig


def _save(fig, path: str | os.PathLike) -> None:
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
