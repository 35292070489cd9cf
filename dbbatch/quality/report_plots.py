"""The batch report's figures (matplotlib, headless): a subject's loss and metric curves, and a sweep's metrics
against its swept settings. Pure: stored numbers in, PNG bytes out."""

from __future__ import annotations

import io
from typing import Any, Optional

from dbbatch.config.metric_names import LOWER_IS_BETTER, METRICS
from dbbatch.config.sweeps import format_value, short_names


def curves_png(entry: Any) -> bytes:
    """The loss curve and the metric curves of one subject (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 2.6), dpi=100, layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    if entry.loss_curve:
        loss_ax.plot(range(1, len(entry.loss_curve) + 1), entry.loss_curve, lw=0.6, color="#999999", label="loss")
        window = max(1, len(entry.loss_curve) // 20)
        if window > 1:
            smooth = [sum(entry.loss_curve[max(0, i - window + 1) : i + 1]) / len(entry.loss_curve[max(0, i - window + 1) : i + 1])
                      for i in range(len(entry.loss_curve))]
            loss_ax.plot(range(1, len(smooth) + 1), smooth, lw=1.4, color="#1f77b4", label=f"mean of {window}")
        loss_ax.legend(fontsize=7)
    loss_ax.set_title("training loss", fontsize=9)
    loss_ax.set_xlabel("step", fontsize=8)
    points = ([{"step": 0, **entry.baseline}] if any(v is not None for v in entry.baseline.values()) else []) + entry.points
    for metric in METRICS:
        xy = [(p["step"], p[metric]) for p in points if p.get(metric) is not None]
        if xy:
            metric_ax.plot(*zip(*xy), marker="o", ms=3, lw=1.2, label=metric)
    if entry.published_step is not None and points:
        metric_ax.axvline(entry.published_step, color="#2ca02c", ls="--", lw=1, label=f"published {entry.published_step}")
    metric_ax.set_title("evaluation (step 0: base model)", fontsize=9)
    metric_ax.set_xlabel("step", fontsize=8)
    if points:
        metric_ax.legend(fontsize=6, ncol=2)
    for ax in (loss_ax, metric_ax):
        ax.tick_params(labelsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plot_text(text: str, limit: int) -> str:
    """Stored text as a matplotlib label: shortened, and `$` escaped (an odd or malformed $...$ pair is parsed
    as mathtext and raises when the figure is drawn)."""
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def _x_order(v: Any) -> tuple[int, float, str]:
    """Where a swept value sits on its axis: numbers in numeric order, then the rest (text, booleans, null) by name."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, format_value(v))


def sweep_metrics(group: dict[str, Any]) -> list[str]:
    """The metrics some variant of the group has a published score of: the table's and the plot's."""
    return [m for m in METRICS if any(r["scores"].get(m) is not None for r in group["variants"])]


def sweep_png(group: dict[str, Any]) -> Optional[bytes]:
    """Every metric (rows) against every swept setting (columns) of one sweep_groups() group (matplotlib,
    headless), or None when no variant has both. Each panel puts the setting's distinct values at evenly spaced
    positions (a learning rate and a rank are categories here, not a scale) and joins the variants that share
    their other settings, so an interaction shows as lines that cross; the best variant is a red star."""
    metrics, keys = sweep_metrics(group), group["keys"]
    if not metrics or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = [r for r in group["variants"] if r["status"] == "succeeded"]
    fig = Figure(figsize=(1.0 + 2.8 * len(keys), 0.6 + 2.1 * len(metrics)), dpi=100, layout="constrained")
    axes = fig.subplots(len(metrics), len(keys), squeeze=False)
    names = short_names(keys)  # the settings' names in the variant ids (lr, rank)
    for j, key in enumerate(keys):
        ticks = {_x_order(r["settings"][key]): format_value(r["settings"][key]) for r in rows if key in r["settings"]}
        x_of = {o: i for i, o in enumerate(sorted(ticks))}
        others = [k for k in keys if k != key]
        for i, metric in enumerate(metrics):
            ax = axes[i][j]
            lines: dict[tuple[str, ...], list[tuple[int, float]]] = {}  # the other settings' values -> points
            for r in rows:
                if key in r["settings"] and r["scores"].get(metric) is not None:
                    x, y = x_of[_x_order(r["settings"][key])], r["scores"][metric]
                    rest = tuple(format_value(r["settings"][k]) if k in r["settings"] else "–" for k in others)
                    lines.setdefault(rest, []).append((x, y))
                    if r["id"] == group["best"]:
                        ax.plot([x], [y], marker="*", ms=13, color="#d62728", ls="none", zorder=5, label="best")
            named = 1 < len(lines) <= 8  # more lines than a legend can name are left unnamed
            for rest, xy in sorted(lines.items()):
                label = ", ".join(f"{names[k]}={v}" for k, v in zip(others, rest))
                ax.plot(*zip(*sorted(xy)), marker="o", ms=4, lw=1.2, label=_plot_text(label, 40) if named else None)
            ax.set_xticks(range(len(ticks)), [_plot_text(ticks[o], 12) for o in sorted(ticks)])
            ax.set_xlim(-0.5, len(ticks) - 0.5)
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.set_title(_plot_text(key, 40), fontsize=9)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=6)
            if j == 0:
                ax.set_ylabel(metric + (" ↓" if metric in LOWER_IS_BETTER else ""), fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
