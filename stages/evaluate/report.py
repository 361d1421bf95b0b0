"""The evaluation report: `metrics.json`, `report.md` (the paper's table layout) and two plots.

`metrics.png`        a bar chart per metric family, one bar per model;
`retrieval_grid.png` queries of one retrieval dataset with their top-8 results (green: same class,
                     red: other class; the query itself left out) for the first and the last model.
Written only when `metrics.json` changes or a file is missing, so a finished run stays untouched.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from shards.atomic import write_json_atomic, write_text_atomic

GRID_QUERIES = 6
GRID_RESULTS = 8


def columns(all_metrics: dict[str, dict[str, Any]]) -> list[tuple[str, tuple[str, ...]]]:
    """(header, path into a model's metrics) for every metric some model has."""
    first = next(iter(all_metrics.values()))
    found = []
    for name in first.get("i2i_map", {}):
        found.append((f"i2i mAP {name}", ("i2i_map", name)))
        groups = first.get("i2i_map_by_group", {}).get(name, {})
        found += [(f"  {name}/{g}", ("i2i_map_by_group", name, g)) for g in groups]
    if "knn_top1" in first:
        found.append(("k-NN top-1", ("knn_top1",)))
    if "zero_shot" in first:
        found += [("zero-shot top-1", ("zero_shot", "top1")), ("zero-shot top-5", ("zero_shot", "top5"))]
    for key in sorted(
        first.get("text_to_image", {}), key=lambda k: (k == "mAP", int(k[2:]) if k[2:].isdigit() else 0)
    ):
        found.append((f"T2I {key}", ("text_to_image", key)))
    return found


def _value(metrics: dict[str, Any], path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return float(metrics)


def markdown_table(all_metrics: dict[str, dict[str, Any]]) -> str:
    """Rows: models; columns: metrics in percent (one decimal), as in the paper's Table 1."""
    cols = columns(all_metrics)
    lines = ["| model | " + " | ".join(h.strip() for h, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for model, m in all_metrics.items():
        cells = [_value(m, path) for _, path in cols]
        lines.append(
            f"| {model} | " + " | ".join("-" if c is None else f"{100 * c:.1f}" for c in cells) + " |"
        )
    return "\n".join(lines)


def write_report(cfg, data, folder: Path, all_metrics: dict[str, dict[str, Any]]) -> str:
    table = markdown_table(all_metrics)
    files = [folder / n for n in ("metrics.json", "report.md", "metrics.png", "retrieval_grid.png")]
    previous = json.loads(files[0].read_text()) if files[0].exists() else None
    if previous == all_metrics and all(f.exists() for f in files[1:3]):
        return table
    text = (
        f"# Evaluation `{cfg.name}`\n\nAll values in percent. Models: "
        + ", ".join(f"`{m.name}` ({m.stage or m.checkpoint or 'random weights'})" for m in cfg.models)
        + f".\n\n{table}\n\n![metrics](metrics.png)\n"
    )
    grid = cfg.grid or next(iter(cfg.retrieval), None)
    if grid is not None:
        plot_retrieval_grid(cfg, data.retrieval[grid], folder)
        text += (
            f"\nTop-{GRID_RESULTS} results on `{grid}` (green: same class):\n\n![grid](retrieval_grid.png)\n"
        )
    plot_metrics(all_metrics, folder / "metrics.png")
    write_text_atomic(folder / "report.md", text)
    write_json_atomic(files[0], all_metrics)  # last: its presence means the report matches it
    return table


def _figure_bytes(figure) -> bytes:
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=110, bbox_inches="tight")
    return out.getvalue()


def plot_metrics(all_metrics: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [(h, p) for h, p in columns(all_metrics) if not h.startswith("  ")]
    models = list(all_metrics)
    width = 0.8 / len(models)
    figure, axis = plt.subplots(figsize=(max(6, 1.4 * len(cols)), 3.6))
    for i, model in enumerate(models):
        values = [100 * (_value(all_metrics[model], p) or 0) for _, p in cols]
        axis.bar(np.arange(len(cols)) + i * width, values, width, label=model)
    axis.set_xticks(np.arange(len(cols)) + 0.4 - width / 2, [h for h, _ in cols], rotation=20, ha="right")
    axis.set_ylabel("%")
    axis.set_ylim(0, 100)
    axis.legend(fontsize=8, ncols=min(len(models), 5))
    _write_png(path, figure)


def _write_png(path: Path, figure) -> None:
    import matplotlib.pyplot as plt

    from shards.atomic import atomic_write

    data = _figure_bytes(figure)
    plt.close(figure)
    with atomic_write(path) as handle:
        handle.write(data)


def grid_rows(emb: np.ndarray, labels: np.ndarray, queries: np.ndarray) -> list[tuple[int, list[int]]]:
    """(query, its top results without itself) by cosine."""
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    rows = []
    for q in queries:
        order = [int(i) for i in np.argsort(-(emb @ emb[q]), kind="stable") if i != q]
        rows.append((int(q), order[:GRID_RESULTS]))
    return rows


def plot_retrieval_grid(cfg, images, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from stages.evaluate.scoring import embedding_file

    shown = [cfg.models[0]] + ([cfg.models[-1]] if len(cfg.models) > 1 else [])
    queries = np.linspace(0, len(images.refs) - 1, GRID_QUERIES).astype(int)
    figure, axes = plt.subplots(
        GRID_QUERIES,
        len(shown) * (GRID_RESULTS + 1),
        figsize=(1.0 * len(shown) * (GRID_RESULTS + 1), 1.1 * GRID_QUERIES),
        squeeze=False,
    )
    for m, entry in enumerate(shown):
        emb = np.load(embedding_file(folder, entry.name, images))
        for r, (q, results) in enumerate(grid_rows(emb, images.labels, queries)):
            for c, index in enumerate([q, *results]):
                axis = axes[r, m * (GRID_RESULTS + 1) + c]
                axis.imshow(Image.open(io.BytesIO(images.refs[index].read())).convert("RGB"))
                axis.set_xticks([])
                axis.set_yticks([])
                colour = (
                    "black" if c == 0 else ("green" if images.labels[index] == images.labels[q] else "red")
                )
                for spine in axis.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(3 if c else 1)
            axes[0, m * (GRID_RESULTS + 1)].set_title(entry.name, fontsize=9, loc="left")
    _write_png(folder / "retrieval_grid.png", figure)
