"""Training curves (fastllm.plot): the panels, axes and data of each figure, readable ticks, log scale, atomic
PNG files, the --eval-task panel, and the curves a real pre-training, GRPO and reward-model run write."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from fastllm.plot import (  # noqa: E402
    plot_run,
    plot_training,
    read_log,
    reward_model_figure,
    rl_figure,
    smooth,
    task_metric_keys,
    training_figure,
)


def training_rows(steps=800, eval_every=100):
    rng = np.random.default_rng(0)
    rows = []
    for s in range(steps):
        if s % eval_every == 0 or s == steps - 1:
            rows.append({"step": s, "val_loss": 8.0 * math.exp(-s / 300) + 3.0})
        lr = 1e-3 * min(1.0, (s + 1) / 50)
        rows.append({"step": s, "loss": 8.0 * math.exp(-s / 300) + 2.9 + 0.1 * rng.standard_normal(), "lr": lr,
                     "grad_norm": 1.0 + 0.2 * rng.random(), "dt": 0.1, "tok_per_s": 12_000 + 500 * rng.random()})
    return rows


def panel(fig, title):
    (ax,) = [a for a in fig.axes if a.get_title() == title]
    return ax


def nice(step: float) -> bool:
    """1, 2, 2.5 or 5 times a power of ten."""
    k = 10 ** math.floor(math.log10(step))
    return any(math.isclose(step, m * k) for m in (1, 2, 2.5, 5, 10))


def test_training_figure_panels_axes_and_data():
    rows = training_rows()
    fig = training_figure(rows, title="run/")
    assert fig._suptitle.get_text() == "run/"
    titles = [a.get_title() for a in fig.axes]
    assert titles == ["loss", "learning rate", "gradient norm (before clipping)", "throughput"]
    for ax in fig.axes:
        assert ax.get_xlabel() == "step" and ax.get_ylabel()
    loss = panel(fig, "loss")
    assert loss.get_ylabel() == "cross-entropy (nats/token)" and loss.get_yscale() == "linear"
    labels = {ln.get_label(): ln for ln in loss.lines}
    val = labels["validation"]
    np.testing.assert_array_equal(val.get_xdata(), [r["step"] for r in rows if "val_loss" in r])
    np.testing.assert_allclose(val.get_ydata(), [r["val_loss"] for r in rows if "val_loss" in r])
    raw = [ln for ln in loss.lines if ln.get_alpha() is not None and ln.get_alpha() < 1][0]
    np.testing.assert_allclose(raw.get_ydata(), [r["loss"] for r in rows if "loss" in r])
    smooth = labels["train (smoothed)"].get_ydata()
    assert np.std(np.diff(smooth)) < np.std(np.diff(raw.get_ydata())) / 3  # the moving average is smooth
    np.testing.assert_allclose(panel(fig, "learning rate").lines[0].get_ydata(), [r["lr"] for r in rows if "lr" in r])
    assert panel(fig, "gradient norm (before clipping)").get_yscale() == "log"
    # readable ticks: nice steps (0, 100, 200, ...), not 599 or 799
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if 0 <= t <= 799]
        assert len(ticks) >= 4 and all(float(t).is_integer() for t in ticks)
        assert len({round(b - a, 6) for a, b in zip(ticks, ticks[1:])}) == 1 and nice(ticks[1] - ticks[0])
    fig.canvas.draw()
    speed = panel(fig, "throughput")
    assert any("," in t.get_text() for t in speed.get_yticklabels())  # 12,000 not 12000.0 or 1.2e4


def test_log_scale_and_missing_data():
    fig = training_figure(training_rows(200, 50), log_scale=True)
    loss = panel(fig, "loss")
    assert loss.get_yscale() == "log"
    fig.canvas.draw()
    assert [t.get_text() for t in loss.get_yticklabels() if t.get_text()]  # plain numbers on the log axis
    # only validation rows, a non-finite value, one step: no exception, empty panels say so
    fig = training_figure([{"step": 0, "val_loss": 5.0}, {"step": 1, "val_loss": float("nan")}])
    assert len(panel(fig, "loss").lines) == 1
    assert any(t.get_text() == "no data yet" for t in panel(fig, "throughput").texts)
    training_figure([])


def test_rl_and_reward_model_figures():
    rows = []
    for s in range(60):
        rows.append({"step": s, "reward": 0.2 + s / 100, "reward_std": 0.3, "accuracy": s / 80, "kl": 0.001 * s,
                     "completion_len": 4.0 - s / 60, "loss": 0.0, "grad_norm": 1.0})
        if s % 20 == 0:
            rows.append({"step": s, "eval_accuracy": s / 70})
    fig = rl_figure(rows)
    assert [a.get_title() for a in fig.axes] == ["reward", "accuracy", "KL to the reference policy",
                                                 "completion length"]
    assert all(a.get_xlabel() == "GRPO step" for a in fig.axes)
    acc = panel(fig, "accuracy")
    held = [ln for ln in acc.lines if ln.get_label() == "held-out prompts, greedy"][0]
    np.testing.assert_allclose(held.get_ydata(), [0, 20 / 70, 40 / 70])
    assert acc.get_ylim() == pytest.approx((-0.03, 1.03))
    assert panel(fig, "reward").collections  # the +- 1 std band

    rows = [{"step": 0, "val_accuracy": 0.5}] + [{"step": s, "loss": 0.7 - s / 100, "accuracy": 0.5 + s / 100}
                                                 for s in range(30)] + [{"step": 30, "val_accuracy": 0.8}]
    fig = reward_model_figure(rows)
    assert [a.get_title() for a in fig.axes] == ["loss", "preference accuracy"]
    val = [ln for ln in panel(fig, "preference accuracy").lines if ln.get_label() == "held-out pairs"][0]
    np.testing.assert_allclose(val.get_ydata(), [0.5, 0.8])


def test_eval_task_panel():
    """--eval-task metrics get a panel of their own (dots, +- stderr bands), in the training and the GRPO figures;
    their stderr and bpb's counts are not drawn; bits per byte get their own axis label, accuracies 0..1."""
    rows = training_rows(steps=300)
    for s, v in ((0, 0.25), (150, 0.4), (299, 0.6)):
        rows.append({"step": s, "mc/acc": v, "mc/acc_stderr": 0.05, "mc/acc_norm": v + 0.05,
                     "mc/acc_norm_stderr": 0.05})
    assert task_metric_keys(rows) == ["mc/acc", "mc/acc_norm"]
    fig = training_figure(rows)
    assert [a.get_title() for a in fig.axes][-1] == "evaluation: mc" and len(fig.axes) == 5
    ax = panel(fig, "evaluation: mc")
    acc = [ln for ln in ax.lines if ln.get_label() == "mc/acc"][0]
    np.testing.assert_allclose(acc.get_xdata(), [0, 150, 299])
    np.testing.assert_allclose(acc.get_ydata(), [0.25, 0.4, 0.6])
    assert len(ax.collections) == 2 and ax.get_ylim() == pytest.approx((-0.03, 1.03))  # the two stderr bands
    assert ax.get_ylabel() == "fraction correct"

    rl = [{"step": s, "reward": 0.1, "kl": 0.0, "accuracy": 0.1, "completion_len": 3.0} for s in range(10)]
    rl += [{"step": s, "eval_accuracy": 0.2, "bpb/bpb": 3.0 - s / 10, "bpb/nats_per_token": 2.0, "bpb/tokens": 90.0,
            "bpb/bytes": 100.0, "bpb/bytes_per_token": 1.1} for s in (0, 9)]
    assert task_metric_keys(rl) == ["bpb/bpb"]
    ax = panel(rl_figure(rl), "evaluation: bpb")
    assert [ln.get_label() for ln in ax.lines] == ["bpb/bpb"] and ax.get_ylabel() == "bits per byte"
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [3.0, 2.1])
    assert task_metric_keys([{"step": 0, "gen/pass@1": 0.5, "gen/pass@1_stderr": 0.1, "gen/pass@8": 0.9}]) == [
        "gen/pass@1", "gen/pass@8"]


def test_png_written_atomically_and_plot_run(tmp_path):
    from matplotlib.image import imread

    path = tmp_path / "loss.png"
    path.write_bytes(b"old")
    plot_training(training_rows(100, 25), path)
    img = imread(path)
    assert img.shape[:2] == (840, 1200) and img[..., :3].std() > 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]  # no temporary file left behind

    run = tmp_path / "rl"
    run.mkdir()
    lines = [json.dumps({"step": s, "reward": 0.5, "kl": 0.0, "accuracy": 0.5, "completion_len": 3.0})
             for s in range(5)]
    (run / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "rew')  # a line cut by a kill
    assert len(read_log(run / "log.jsonl")) == 5
    assert plot_run(run) == run / "rl.png" and (run / "rl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smooth_keeps_trends_and_removes_noise():
    x = np.arange(500, dtype=np.float64)
    np.testing.assert_allclose(smooth(3.0 - 0.01 * x, 10), 3.0 - 0.01 * x, atol=1e-9)  # a trend: no lag, ends too
    np.testing.assert_allclose(smooth(np.full(7, 2.5), 3), 2.5)
    noise = np.random.default_rng(0).standard_normal(500)
    assert np.std(smooth(noise, 10)) < np.std(noise) / 3
    curve = 8 * np.exp(-x / 60)  # a fast-falling loss: the smoothed line stays close (an EMA lags far above it)
    assert np.abs(smooth(curve, 10) - curve).max() < 0.1
    assert smooth([4.0], 3).tolist() == [4.0] and smooth([], 3).size == 0


def test_training_run_writes_the_figure(tmp_path):
    """A real run: loss.png's data are the run's log rows."""
    from fastllm.data import write_shard
    from fastllm.train import TrainConfig, train

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "train_000000.bin", rng.integers(0, 64, 4000).astype(np.uint32), 64)
    write_shard(data / "val_000000.bin", rng.integers(0, 64, 1000).astype(np.uint32), 64)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), model="tiny", batch_size=2, seq_len=16,
                      max_steps=6, eval_every=3, ckpt_every=3, loss_log_scale=True)
    s = train(cfg, progress=False, log=lambda *a: None)
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_log(s["log"])
    fig = training_figure(rows, log_scale=True)
    assert len(panel(fig, "loss").lines[0].get_ydata()) == 6
