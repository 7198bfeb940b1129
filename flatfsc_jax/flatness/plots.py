"""The flatness study's figures (:mod:`flatfsc_jax.flatness.study`): the primary measure
against the primary outcome, and tau of every measure. Both read ``results.json``'s plain
data, so the notebook redraws them without the study's workdir."""

from __future__ import annotations

import math

import numpy as np


def new_axes(ax, figsize=(6, 4.5)):
    """``(figure, axes, pyplot)``: the caller's ``ax`` (a notebook; figure None), or a new
    figure on the Agg backend (a script writing a file)."""
    import matplotlib

    if ax is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if ax is not None:
        return None, ax, plt
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax, plt


def finish(fig, path: str | None) -> None:
    """Lays out a figure :func:`new_axes` made and writes it to ``path`` (then closes it)."""
    if fig is None:
        return
    fig.tight_layout()
    if path:
        import matplotlib.pyplot as plt

        fig.savefig(path, dpi=120)
        plt.close(fig)


def plot_scatter(results: dict, path: str | None = None, ax=None):
    """The primary measure against the primary outcome, one colour per optimiser; the
    shaded bands are mean +- 1.96 sd over the seeds of each anchor configuration (the
    seed noise of the outcome, and of the measure as the vertical band)."""
    mname, oname = results["primary_measure"], results["primary_outcome"]
    x = np.asarray(results["measures"].get(mname, []), float)
    y = 100 * np.asarray(results["outcomes"][oname], float)
    members = results["members"]
    fig, ax, plt = new_axes(ax)
    opts = list(dict.fromkeys(m["optimiser"] for m in members))
    colours = dict(zip(opts, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for cfg in sorted({_configuration(m) for m in members if m["anchor"]}):
        k = [i for i, m in enumerate(members) if _configuration(m) == cfg]
        c = colours[members[k[0]]["optimiser"]]
        if len(k) >= 2 and len(x):
            for lo, hi, span in (
                (*_band(y[k]), ax.axhspan),
                (*_band(x[k]), ax.axvspan),
            ):
                span(lo, hi, color=c, alpha=0.12, lw=0)
    if len(x):
        for o in opts:
            k = [i for i, m in enumerate(members) if m["optimiser"] == o]
            ax.scatter(x[k], y[k], color=colours[o], label=o, s=24)
    tau = (results.get("primary") or {}).get("tau", {}).get("tau", math.nan)
    ax.set_xlabel(f"{mname} (larger = sharper)")
    ax.set_ylabel(f"NCC accuracy, {oname} (%)")
    ax.set_title(f"n = {results['n']}, tau_b = {tau:+.2f}; bands: anchor seed noise")
    ax.legend(title="optimiser")
    finish(fig, path)
    return ax


def plot_taus(results: dict, path: str | None = None, ax=None):
    """tau_b and its 95% CI of every measure against the primary outcome, flatness
    measures and baselines in two colours, the detectable |tau| dashed."""
    rows = [r for r in results["rows"] if r["outcome"] == results["primary_outcome"]]
    fig, ax, _ = new_axes(ax)
    for i, r in enumerate(rows):
        colour = "C0" if r["kind"] == "flatness" else "C1"
        ax.plot([r["tau"]], [i], "o", color=colour)
        if not math.isnan(r["ci_low"]):
            ax.plot([r["ci_low"], r["ci_high"]], [i, i], color=colour)
    ax.set_yticks(range(len(rows)), [r["measure"] for r in rows])
    ax.invert_yaxis()
    bound = results["min_detectable_tau"]
    for v in (-bound, bound):
        ax.axvline(v, color="grey", ls="--", lw=0.8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlim(-1, 1)
    ax.set_xlabel(f"Kendall tau_b with {results['primary_outcome']} (blue: flatness)")
    finish(fig, path)
    return ax


def _configuration(m: dict) -> str:
    return m["name"].rsplit("_s", 1)[0]


def _band(v):
    mean, sd = float(np.mean(v)), float(np.std(v, ddof=1))
    return mean - 1.96 * sd, mean + 1.96 * sd
