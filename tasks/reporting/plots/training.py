"""The training stage's figure."""

from __future__ import annotations

from matplotlib.figure import Figure


def training_curves(history: list[dict], chance: float | None = None) -> Figure:
    """Loss and accuracy per epoch, the kept epoch marked, and the accuracy of guessing."""
    fig = Figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    for ax, metric, title in ((loss_ax, "loss", "Loss"), (acc_ax, "acc", "Accuracy")):
        for split in ("train", "val"):
            ax.plot(epochs, [row[f"{split}_{metric}"] for row in history], marker="o", label=split)
        for row in history:
            if row["kept"]:
                ax.axvline(row["epoch"], color="grey", linestyle="--", linewidth=1, label=f"kept (epoch {row['epoch']})")
        if metric == "acc" and chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label=f"chance ({chance:.3f})")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    return fig
