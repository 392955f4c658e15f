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


def _new_figure(num_panels: int, ncols: int, panel_size: float) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, num_panels))
    nrows = math.ceil(num_panels / ncols)
    fig = Figure(figsize=(panel_size * ncols, panel_size * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(num_panels)]
    return fig, axes


def _log_density_grid(
    log_density_fn: Callable[[torch.Tensor], Any], extent: Sequence[float], grid_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs = np.linspace(extent[0], extent[1], grid_size)
    ys = np.linspace(extent[2], extent[3], grid_size)
    gx, gy = np.meshgrid(xs, ys)
    points = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], axis=1))
    values = log_density_fn(points)
    values = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    return gx, gy, values.reshape(gx.shape)


def scatter_over_density(
    path: str | Path,
    panels: Sequence[tuple[str, np.ndarray]],
    log_density_fn: Callable[[torch.Tensor], Any] | None = None,
    extent: Sequence[float] = (-4.0, 4.0, -4.0, 4.0),
    *,
    grid_size: int = 200,
    num_levels: int = 8,
    log_range: float = 10.0,
    max_points: int = 4000,
    ncols: int = 4,
    panel_size: float = 3.0,
    title: str | None = None,
) -> Path:
    """One subplot per (title, samples (N, d)) panel: coordinates 0 and 1 scattered over contours.

    log_density_fn maps grid points, a float64 tensor (G, 2), to log-densities (G,) (tensor or array). For
    d = 2 pass the target's log_prob; for d > 2 pass a 2-D marginal (GaussianMixture.marginal([0, 1])) or
    None to skip the contours. Contours are drawn on the log-density at `num_levels` levels spread over
    `log_range` nats below its maximum. At most max_points samples per panel are drawn.
    """
    if not panels:
        raise ValueError("scatter_over_density needs at least one panel")
    fig, axes = _new_figure(len(panels), ncols, panel_size)
    grid = None if log_density_fn is None else _log_density_grid(log_density_fn, extent, grid_size)
    for ax, (name, samples) in zip(axes, panels):
        pts = np.asarray(samples)[:max_points]
        if pts.ndim != 2 or pts.shape[1] < 2:
            raise ValueError(f"panel {name!r}: samples must have shape (N, d >= 2), got {pts.shape}")
        if grid is not None:
            gx, gy, lz = grid
            top = float(np.max(lz))
            ax.contour(gx, gy, lz, levels=np.linspace(top - log_range, top, num_levels), colors="0.4", linewidths=0.7)
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, color="tab:blue", rasterized=True)
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def metric_curves(
    path: str | Path,
    curves: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    metrics: Sequence[str],
    *,
    references: Mapping[str, float] | None = None,
    ylims: Mapping[str, tuple[float, float]] | None = None,
    ncols: int = 3,
    panel_size: float = 3.5,
) -> Path:
    """One subplot per metric with a line per method: curves[method][metric] = [(step, value), ...].

    references[metric], if given, is drawn as a dashed horizontal line (an exact value or a noise floor).
    Methods without a metric are skipped in that subplot.
    """
    if not metrics:
        raise ValueError("metric_curves needs at least one metric")
    fig, axes = _new_figure(len(metrics), ncols, panel_size)
    for ax, metric in zip(axes, metrics):
        for method, per_metric in curves.items():
            points = per_metric.get(metric)
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=method, linewidth=1.2)
        if references and metric in references:
            ax.axhline(references[metric], color="k", linestyle="--", linewidth=0.8, label="reference")
        if ylims and metric in ylims:  # keep diverging runs from flattening the others
            ax.set_ylim(*ylims[metric])
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
