"""Validation accuracy against training step for the entries of a zoo: does the budget converge?

Every training run logs its validation accuracy (NCC on the domain's *validation*
classes, the same episodes at every validation) to ``metrics.jsonl`` in its zoo entry.
``plot_convergence`` draws one panel per domain with a line per method (ERM, SAM, fused
families), the points at the end of each warm-restart cycle marked, and optionally a
vertical line at the configured budget, so a reader sees whether accuracy had stopped
rising when training stopped. The main job writes ``<workdir>/report/convergence.png``;
``python -m flatfsc_jax.cli.convergence --zoo=DIR --out=curves.png`` draws any zoo (e.g. a
longer run used to choose the budget).
"""

from __future__ import annotations

from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.training import metrics_writer


def read_curves(zoo: zoo_lib.Zoo, benchmark: str | None = None) -> dict:
    """``{domain: {method: [(step, accuracy %), ...]}}`` of every entry with a metrics
    log (complete or not: an unfinished run's curve is still evidence)."""
    curves: dict = {}
    root = zoo.root
    if not root.exists():
        return curves
    for path in sorted(root.glob("*/*/*/metrics.jsonl")):
        bench, domain, method = path.parts[-4:-1]
        if benchmark and bench != benchmark:
            continue
        points = {}
        for record in metrics_writer.read_jsonl(path):  # bad lines: one warning
            acc = record.get("val_accuracy")
            if isinstance(acc, int | float) and not isinstance(acc, bool):
                points[record["step"]] = 100.0 * float(acc)
        if points:
            curves.setdefault(domain, {})[method] = sorted(points.items())
    return curves


def plot_convergence(curves: dict, path, *, budgets: dict | None = None, title: str = "") -> None:
    """One panel per domain, a line per method; ``budgets[domain]`` draws the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(curves)
    if not domains:
        raise ValueError("no validation curves to plot (no metrics.jsonl with val_accuracy)")
    cols = min(len(domains), 5)
    rows = -(-len(domains) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows), squeeze=False)
    for ax, domain in zip(axes.flat, domains, strict=False):
        for method, points in sorted(curves[domain].items()):
            steps, acc = zip(*points, strict=True)
            ax.plot(steps, acc, marker="o", markersize=3, label=method)
        if budgets and domain in budgets:
            ax.axvline(budgets[domain], color="grey", linestyle="--", linewidth=1)
        ax.set_title(domain)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("validation accuracy (%)")
    for ax in list(axes.flat)[len(domains) :]:
        ax.axis("off")
    axes.flat[0].legend(frameon=False, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
