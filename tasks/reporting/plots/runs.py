"""The learning curve over runs (drawn by the flow, not by a stage)."""

from __future__ import annotations

from matplotlib.figure import Figure


def learning_curve(points: list[dict], chance: float | None = None, title: str | None = None) -> Figure:
    """Accuracy (test where there is a test split) against the number of training images, one point
    per run, with its 95% interval where known, and the accuracy of guessing (`chance`)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    points = sorted(points, key=lambda p: p["train_images"])
    x, y = [p["train_images"] for p in points], [p["accuracy"] for p in points]
    bounds = [p.get("accuracy_ci") or [p["accuracy"]] * 2 for p in points]
    ax.errorbar(x, y, yerr=[[v - b[0] for v, b in zip(y, bounds)], [b[1] - v for v, b in zip(y, bounds)]],
                marker="o", capsize=3, label="accuracy (95% interval)")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.3f})")
    ax.set_xscale("log" if len(points) > 1 and points[-1]["train_images"] > 10 * points[0]["train_images"] else "linear")
    ax.set_xlabel("training images")
    ax.set_ylabel(f"{points[0]['split']} accuracy" if len({p['split'] for p in points}) == 1 else "accuracy")
    ax.set_title(title or "Learning curve (runs with otherwise equal settings)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def sweep_comparison(labels: list[str], values: list[float], bounds: list[list[float]], metric: str,
                     best: int | None, chance: float | None = None) -> Figure:
    """One bar per setting of a sweep: the metric with its 95% interval, the best setting marked."""
    fig = Figure(figsize=(7, 0.45 * len(labels) + 1.4))
    ax = fig.subplots()
    rows = list(range(len(labels)))[::-1]
    errors = [[v - b[0] for v, b in zip(values, bounds)], [b[1] - v for v, b in zip(values, bounds)]]
    colours = ["tab:orange" if i == best else "tab:blue" for i in range(len(labels))]
    ax.barh(rows, values, xerr=errors, color=colours, capsize=3)
    if chance is not None:
        ax.axvline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.3f})")
        ax.legend(fontsize=8)
    ax.set_yticks(rows, labels, fontsize=8)
    ax.set_xlabel(f"{metric} (95% interval)")
    ax.set_title("Sweep: each setting" + (" (best in orange)" if best is not None else ""))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
