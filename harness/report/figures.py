"""The report's plots as PNG bytes (matplotlib's Agg canvas; no pyplot, no global state, no
window), embedded inline as data URIs.

PNGs carry no ``Software`` text chunk, so the report holds no address of any kind.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.report.model import format_value

__all__ = ["heatmap_png", "importance_png", "pareto_png", "steps_png"]

LABELS = {
    "dino": "DINO",
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "weighted": "weighted score",
    "div": "DIV",
    "div_dino": "DIV-DINO",
    "pres": "PRES",
}


def label(metric: str) -> str:
    """The display name of a metric (``dino`` -> ``DINO``)."""
    return LABELS.get(metric, metric)


def _figure(width: float = 6.4, height: float = 4.2) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def pareto_png(
    points: pd.DataFrame,
    subject_metric: str,
    prompt_metric: str,
    references: Mapping[str, Mapping[str, float]],
) -> bytes:
    """Subject score versus prompt score of every sweep point (``subject_score``,
    ``prompt_score``, ``pareto``), the front joined, the base model a star and the real-photo
    ceiling a dashed line."""
    fig = _figure()
    ax = fig.add_subplot()
    rest, front = points[~points["pareto"]], points[points["pareto"]]
    ax.scatter(rest["prompt_score"], rest["subject_score"], s=18, c="#9aa5b1", label="sweep point")
    front = front.sort_values("prompt_score")
    ax.plot(front["prompt_score"], front["subject_score"], "o-", c="#d1495b", label="Pareto front")
    base = references.get("baseline") or {}
    if subject_metric in base and prompt_metric in base:
        ax.scatter(
            [base[prompt_metric]],
            [base[subject_metric]],
            marker="*",
            s=160,
            c="#2e4057",
            label="base model",
            zorder=3,
        )
    ceiling = (references.get("real_ceiling") or {}).get(subject_metric)
    if ceiling is not None:
        ax.axhline(ceiling, ls="--", c="#00798c", label=f"real photos ({label(subject_metric)})")
    ax.set_xlabel(f"prompt fidelity ({label(prompt_metric)})")
    ax.set_ylabel(f"subject fidelity ({label(subject_metric)})")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _png(fig)


def steps_png(records: pd.DataFrame, score_label: str) -> bytes:
    """``score`` versus ``checkpoint_step``, one line per training configuration (``run_key``)."""
    fig = _figure()
    ax = fig.add_subplot()
    for key, rows in records.groupby("run_key", sort=True):
        rows = rows.sort_values("checkpoint_step")
        ax.plot(rows["checkpoint_step"], rows["score"], "o-", label=str(key))
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel(score_label)
    ax.legend(title="run_key", fontsize="x-small", ncols=2)
    ax.grid(alpha=0.3)
    return _png(fig)


def importance_png(importances: Mapping[str, Mapping[str, float]]) -> bytes:
    """One horizontal bar chart per objective: parameter importance for a high value."""
    names = list(importances)
    fig = _figure(width=4.0 * max(1, len(names)), height=3.6)
    axes = fig.subplots(1, max(1, len(names)), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=False):
        values = dict(importances[name])
        params = sorted(values, key=lambda p: values[p])
        ax.barh(params, [values[p] for p in params], color="#00798c")
        ax.set_title(f"for a high {label(name)}", fontsize="medium")
        ax.set_xlabel("importance (PED-ANOVA)")
        ax.tick_params(axis="y", labelsize="small")
    return _png(fig)


def heatmap_png(matrices: Mapping[str, pd.DataFrame], columns: Sequence[str]) -> bytes:
    """One heat map per metric: prompts (rows) x points (columns), each cell its value."""
    fig = _figure(
        width=max(5.0, 1.4 * len(columns) * len(matrices)),
        height=1.2 + 0.45 * max((len(m) for m in matrices.values()), default=1),
    )
    axes = fig.subplots(1, max(1, len(matrices)), squeeze=False)[0]
    for ax, (metric, matrix) in zip(axes, matrices.items(), strict=False):
        values = matrix[list(columns)].to_numpy(dtype=float)
        image = ax.imshow(values, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(columns)), list(columns), rotation=30, ha="right", fontsize="small")
        ax.set_yticks(range(len(matrix)), [p[:40] for p in matrix.index], fontsize="small")
        for (i, j), value in pd.DataFrame(values).stack().items():
            ax.text(
                int(j),
                int(i),
                format_value(value, "score"),
                ha="center",
                va="center",
                fontsize="x-small",
                color="w",
            )
        ax.set_title(label(metric), fontsize="medium")
        fig.colorbar(image, ax=ax, shrink=0.8)
    return _png(fig)
