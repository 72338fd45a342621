"""The three-panel plot of a dense -> warmup -> sparse training run (train_kv_recall.py, train_packed_llama.py):
a loss panel the script fills, the indexer's recall of the teacher's top blocks, and answer accuracy in both modes."""

PHASE_COLORS = dict(dense="tab:blue", warmup="tab:orange", sparse="tab:green")


def plot_phases(frame, csv_path, loss_panel, titles, xlabel: str, suptitle: str, log_loss: bool = False) -> str:
    """Draw ``frame`` (the run's CSV rows, column ``t`` the x axis) and save it beside ``csv_path`` as a PNG (its
    path returned). ``loss_panel(ax, part, color, phase)`` draws one phase's losses in the first panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for phase, part in frame.groupby("phase", sort=False):
        color = PHASE_COLORS.get(phase)
        loss_panel(axes[0], part, color, phase)
        axes[1].plot(part.t, part.recall, "o-", color=color, label=phase)
        axes[2].plot(part.t, part.sparse_accuracy, "o-", color=color, label=f"{phase}: sparse mode")
        axes[2].plot(part.t, part.dense_accuracy, "x--", color=color, alpha=0.6, label=f"{phase}: dense mode")
    if log_loss:
        axes[0].set_yscale("log")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7)
    fig.suptitle(suptitle)
    fig.tight_layout()
    out = str(csv_path).replace(".csv", ".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print("wrote", out)
    return out
