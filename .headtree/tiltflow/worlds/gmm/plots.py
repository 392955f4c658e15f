"""Figures of the gmm demo (WORLDS.md section 1, "What the demo shows"): samples over the target's density
contours, and metric curves over training. matplotlib is imported inside the functions and drawn through
the Agg canvas directly, so importing this module is cheap and no global backend is switched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _figure(width: float, height: float) -> Any:
    """A constrained-layout figure drawn on its own Agg canvas (no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _new_figure(num_panels: int, ncols: int, panel_size: float) -> tuple[Any, list[Any]]:
    ncols = max(1, min(ncols, num_panels))
    nrows = math.ceil(num_panels / ncols)
    fig = _figure(panel_size * ncols, panel_size * nrows)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(num_panels)]
    return fig, axes


def _label(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    """A panel's title (9 pt), axis labels (8 pt) and tick labels (7 pt)."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)


def _log_density_grid(log_density_fn: Callable[[torch.Tensor], Any], extent: Sequence[float],
                      grid_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs = np.linspace(extent[0], extent[1], grid_size)
    ys = np.linspace(extent[2], extent[3], grid_size)
    gx, gy = np.meshgrid(xs, ys)
    points = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], axis=1))
    values = log_density_fn(points)
    values = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    return gx, gy, values.reshape(gx.shape)


# Readable names for the metric keys that training and the demo log: (panel title, y-axis label).
METRIC_LABELS: dict[str, tuple[str, str]] = {
    "eval_reward_mean": ("reward (eval)", "mean reward of samples"),
    "eval_mode_tv": ("mode-mass TV to p_tilde (eval)", "total variation"),
    "eval_energy_distance": ("energy distance to p_tilde (eval)", "energy distance"),
    "eval_energy_to_base": ("energy distance to p (eval)", "energy distance"),
    "gen_grad_norm": ("generator gradient norm", "L2 norm"),
    "dm_grad_norm": ("distribution-matching gradient norm", "L2 norm"),
    "gen_dm_loss": ("generator DM loss", "loss"),
    "fake_adsm": ("fake-score denoising loss", "loss"),
}


def metric_label(key: str) -> tuple[str, str]:
    """(title, y-axis label) for a logged metric key: METRIC_LABELS, else the key made readable
    ("eval_foo_bar" -> "foo bar (eval)")."""
    if key in METRIC_LABELS:
        return METRIC_LABELS[key]
    words = key.removeprefix("eval_").replace("_", " ")
    return (f"{words} (eval)" if key.startswith("eval_") else words), words


def _outside_note(ax: Any, samples: np.ndarray, extent: Sequence[float], min_fraction: float) -> None:
    """Say in the panel how many samples lie outside the drawn frame and where they went (mean, sd)."""
    xy = samples[:, :2]
    finite = np.isfinite(xy).all(axis=1)
    inside = finite & (xy[:, 0] >= extent[0]) & (xy[:, 0] <= extent[1])
    inside &= (xy[:, 1] >= extent[2]) & (xy[:, 1] <= extent[3])
    out_finite = finite & ~inside
    n = xy.shape[0]
    if n == 0 or (n - int(inside.sum())) / n < min_fraction:
        return
    lines = [f"{100 * (n - int(inside.sum())) / n:.1f}% of samples outside the frame"]  # .1f: 99.6 is not 100
    if out_finite.any():
        gone = xy[out_finite]
        mean, sd = gone.mean(axis=0), gone.std(axis=0)
        lines.append(f"their mean ({mean[0]:.3g}, {mean[1]:.3g})")
        lines.append(f"their sd ({sd[0]:.3g}, {sd[1]:.3g})")
        cx, cy = 0.5 * (extent[0] + extent[1]), 0.5 * (extent[2] + extent[3])
        hx, hy = 0.5 * (extent[1] - extent[0]), 0.5 * (extent[3] - extent[2])
        dx, dy = (mean[0] - cx) / hx, (mean[1] - cy) / hy
        reach = max(abs(dx), abs(dy))
        if reach > 1:  # their mean is off the frame: an arrow from the centre towards it, stopping at the edge
            tip = (cx + 0.92 * hx * dx / reach, cy + 0.92 * hy * dy / reach)
            ax.annotate("", xy=tip, xytext=(cx, cy), arrowprops={"arrowstyle": "->", "color": "tab:red", "lw": 1.5})
    if (~finite).any():
        lines.append(f"{int((~finite).sum())} samples are NaN or infinite")
    ax.text(0.03, 0.97, "\n".join(lines), transform=ax.transAxes, ha="left", va="top", fontsize=7, color="tab:red",
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "tab:red", "pad": 2})


def scatter_over_density(path: str | Path, panels: Sequence[tuple[str, np.ndarray]],
                         log_density_fn: Callable[[torch.Tensor], Any] | None = None,
                         extent: Sequence[float] = (-4.0, 4.0, -4.0, 4.0), *, grid_size: int = 200,
                         ncols: int = 4, title: str | None = None) -> Path:
    """One subplot (3 x 3 inches) per (title, samples (N, d)) panel: coordinates 0 and 1 scattered over
    contours.

    log_density_fn maps grid points, a float64 tensor (G, 2), to log-densities (G,) (tensor or array). For
    d = 2 pass the target's log_prob; for d > 2 pass a 2-D marginal (GaussianMixture.marginal([0, 1])) or
    None to skip the contours. Contours are drawn on the log-density at 8 levels spread over the 10 nats
    below its maximum. At most 4000 samples per panel are drawn. Axes are labelled x[0] and x[1]; when at
    least 1% of a panel's samples (all of them, not only the drawn ones) lie outside `extent` or are not
    finite, the panel says so and gives their mean and sd.
    """
    if not panels:
        raise ValueError("scatter_over_density needs at least one panel")
    fig, axes = _new_figure(len(panels), ncols, 3.0)
    grid = None if log_density_fn is None else _log_density_grid(log_density_fn, extent, grid_size)
    for ax, (name, samples) in zip(axes, panels):
        all_pts = np.asarray(samples)
        if all_pts.ndim != 2 or all_pts.shape[1] < 2:
            raise ValueError(f"panel {name!r}: samples must have shape (N, d >= 2), got {all_pts.shape}")
        pts = all_pts[:4000]
        if grid is not None:
            gx, gy, lz = grid
            top = float(np.max(lz))
            ax.contour(gx, gy, lz, levels=np.linspace(top - 10.0, top, 8), colors="0.4", linewidths=0.7)
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, color="tab:blue", rasterized=True)
        ax.set(xlim=(extent[0], extent[1]), ylim=(extent[2], extent[3]), aspect="equal")
        _label(ax, name, "x[0]", "x[1]")
        _outside_note(ax, all_pts, extent, 0.01)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _grouped_figure(row_titles: Sequence[str], ncols: int,
                    panel_size: float) -> tuple[Any, list[Any], list[list[Any]], Any]:
    """A figure with one titled row (a subfigure) of ncols panels per row title, and a last, short
    subfigure for the shared legend (returned last)."""
    legend_height = 1.0
    row_height = panel_size + 0.4
    fig = _figure(panel_size * ncols, row_height * len(row_titles) + legend_height)
    ratios = [row_height] * len(row_titles) + [legend_height]
    subfigs = fig.subfigures(len(row_titles) + 1, 1, height_ratios=ratios, squeeze=False)[:, 0]
    row_axes = []
    for sub, title in zip(subfigs, row_titles):
        sub.suptitle(title, fontsize=10, fontweight="bold")
        row_axes.append([sub.add_subplot(1, ncols, i + 1) for i in range(ncols)])
    return fig, [ax for row in row_axes for ax in row], row_axes, subfigs[-1]


def _overlap_notes(curves: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], methods: Sequence[str],
                   metric: str, ylim: tuple[float, float] | None) -> list[str]:
    """'a: under b' for a method whose drawn curve (clipped to ylim) lies within 1% of the axis span of a
    curve drawn after it at every step, so that the reader knows where the hidden line is."""
    drawn = {}
    for m in methods:
        pts = curves[m].get(metric)
        if pts:
            arr = np.asarray(pts, dtype=float)
            drawn[m] = (arr[:, 0], arr[:, 1] if ylim is None else np.clip(arr[:, 1], *ylim))
    if not drawn:
        return []
    values = np.concatenate([v for _, v in drawn.values()])
    lo, hi = ylim if ylim is not None else (np.nanmin(values), np.nanmax(values))
    tol = 0.01 * max(hi - lo, 1e-12)
    order = list(drawn)
    notes = []
    for i, a in enumerate(order):
        for b in order[i + 1 :]:
            (sa, va), (sb, vb) = drawn[a], drawn[b]
            if sa.shape == sb.shape and np.array_equal(sa, sb) and np.all(np.abs(va - vb) <= tol):
                notes.append(f"{a}: under {b}")
                break
    return notes


def _plot_clipped(ax: Any, steps: np.ndarray, values: np.ndarray, ylim: tuple[float, float] | None, color: Any,
                  label: str) -> str | None:
    """Draw one curve; with ylim, values beyond it are drawn on the frame's edge as triangles (a dotted line
    between them) so the method stays visible, and a note like "grpo_only above, up to 3.1e+04" is returned."""
    line = {"label": label, "color": color, "linewidth": 1.2, "marker": "o", "markersize": 2.5}
    if ylim is None:
        ax.plot(steps, values, **line)
        return None
    lo, hi = ylim
    finite = np.isfinite(values)
    above, below = (values > hi) | (values == np.inf), (values < lo) | (values == -np.inf)
    shown = np.clip(np.where(finite, values, np.where(values > 0, hi, lo)), lo, hi)
    shown = np.where(np.isnan(values), np.nan, shown)
    inside = np.where(above | below, np.nan, shown)
    if np.isfinite(inside).any():
        ax.plot(steps, inside, **line)
    else:  # every value is off the axis: a legend entry only (an all-NaN line upsets the layout engine)
        ax.plot([], [], **line)
    if not (above.any() or below.any() or np.isnan(values).any()):
        return None
    ax.plot(steps, shown, color=color, linewidth=1.0, linestyle=":")
    inset = 0.02 * (hi - lo)  # triangles just inside the frame, so they are drawn whole
    for beyond, edge, marker in ((above, hi - inset, "^"), (below, lo + inset, "v")):
        ax.plot(steps[beyond], np.full(int(beyond.sum()), edge), linestyle="none", marker=marker, markersize=4,
                color=color)
    parts = []
    if above.any():
        parts.append(f"up to {np.max(values[above]):.3g}")
    if below.any():
        parts.append(f"down to {np.min(values[below]):.3g}")
    if np.isnan(values).any():
        parts.append(f"{int(np.isnan(values).sum())} NaN")
    return f"{label}: " + "; ".join(parts)


def metric_curves(path: str | Path, curves: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
                  metrics: Sequence[str], *, references: Mapping[str, float] | None = None,
                  ylims: Mapping[str, tuple[float, float]] | None = None, ncols: int = 3, panel_size: float = 3.5,
                  groups: Mapping[str, Sequence[str]] | None = None) -> Path:
    """One subplot per metric with a line per method: curves[method][metric] = [(step, value), ...].

    references[metric], if given, is drawn as a dashed horizontal line (an exact value or a noise floor).
    Methods without a metric are skipped in that subplot. Panel titles and y-axis labels are
    metric_label(metric); the x axis is the training step. With ylims[metric], values beyond the limits are
    drawn on the frame's edge (triangles, dotted) and listed in the panel, so every method in the legend has
    a visible line. groups = {row title: [methods]} draws one row of panels per group (e.g. runs of
    different lengths get their own step axis); without it, every method shares each panel.
    """
    if not metrics:
        raise ValueError("metric_curves needs at least one metric")
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    colors = {method: palette[i % len(palette)] for i, method in enumerate(curves)}
    rows: list[tuple[str | None, list[str]]]
    if groups:
        rows = [(name, [m for m in methods if m in curves]) for name, methods in groups.items()]
        rows = [(name, methods) for name, methods in rows if methods]
        if not rows:
            raise ValueError("metric_curves: no group holds a method that has curves")
        fig, axes, row_axes, legend_holder = _grouped_figure([name for name, _ in rows], len(metrics), panel_size)
    else:
        rows = [(None, list(curves))]
        fig, axes = _new_figure(len(metrics), ncols, panel_size)
        row_axes, legend_holder = [axes], None
    for (_, methods), row in zip(rows, row_axes):
        for ax, metric in zip(row, metrics):
            title, ylabel = metric_label(metric)
            ylim = ylims.get(metric) if ylims else None
            notes = []
            if not any(curves[method].get(metric) for method in methods):
                ax.text(0.5, 0.5, "not logged by these runs", transform=ax.transAxes, ha="center", fontsize=8)
            for method in methods:
                points = curves[method].get(metric)
                if points:
                    steps, values = (np.asarray(v, dtype=float) for v in zip(*points))
                    note = _plot_clipped(ax, steps, values, ylim, colors[method], method)
                    if note:
                        notes.append(note)
            if references and metric in references:
                ax.axhline(references[metric], color="k", linestyle="--", linewidth=0.8, label="reference")
            if ylim is not None:  # keep diverging runs from flattening the others
                ax.set_ylim(*ylim)
            hidden = _overlap_notes(curves, methods, metric, ylim)
            lines = ["training step"]
            if notes:
                lines += ["off the axis (triangles):", *notes]
            if hidden:
                lines += ["hidden by an equal curve:", *hidden]
            # notes go under the x label, outside the data area, so they never cover a line
            _label(ax, title, "\n".join(lines), ylabel)
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen and legend_holder is not None:
        legend_holder.legend(list(seen.values()), list(seen), loc="center", ncols=min(len(seen), 6), fontsize=8)
    elif seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=min(len(seen), 5), fontsize=8)
    return _save(fig, path)
