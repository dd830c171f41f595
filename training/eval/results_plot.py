"""The PNG that goes with every result JSON: scores per method, and retention curves."""

from __future__ import annotations

from pathlib import Path


def plot_results(result: dict, path: str | Path) -> Path:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need the eval extra: scripts/setup.sh eval (or pip install -e '.[eval]')") from exc
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    methods = result["methods"]
    names = list(methods)
    retention = result.get("retention") or {}
    panels = 2 if retention else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    has_acc = any("accuracy" in m for m in methods.values())
    width = 0.38 if has_acc else 0.6
    xs = range(len(names))
    f1 = [methods[n]["f1"] for n in names]
    bars = ax.bar([x - (width / 2 if has_acc else 0) for x in xs], f1, width, label="F1")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    if has_acc:
        acc = [methods[n].get("accuracy", 0.0) for n in names]
        bars = ax.bar([x + width / 2 for x in xs], acc, width, label="choice accuracy")
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.legend(fontsize=8)
    ax.set_xticks(list(xs), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{result['dataset']} / {result['split']}: {result['n_questions']} questions, "
                 f"{result['n_documents']} documents", fontsize=9)
    if retention:
        ax = axes[0][1]
        for name, curve in retention.items():
            ax.plot([p[0] for p in curve], [p[1] for p in curve], marker="o", label=name)
        k = result.get("config", {}).get("protocol", {}).get("retention_k", "k")
        ax.set_xlabel("further documents ingested (M)")
        ax.set_ylabel(f"F1 on questions about the first {k} documents")
        ax.set_ylim(bottom=0)
        ax.set_title("retention", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"base: {result['base_model']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
