"""The learning curve over runs (drawn by the flow, not by a stage)."""

from __future__ import annotations

from matplotlib.figure import Figure


def learning_curve(points: list[dict]) -> Figure:
    """Accuracy (test where there is a test split) against the number of training images, one point per run."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    points = sorted(points, key=lambda p: p["train_images"])
    ax.plot([p["train_images"] for p in points], [p["accuracy"] for p in points], marker="o")
    ax.set_xscale("log" if len(points) > 1 and points[-1]["train_images"] > 10 * points[0]["train_images"] else "linear")
    ax.set_xlabel("training images")
    ax.set_ylabel(f"{points[0]['split']} accuracy" if len({p['split'] for p in points}) == 1 else "accuracy")
    ax.set_title("Learning curve (runs with otherwise equal settings)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig

