"""The flatness study's outputs (:mod:`flatfsc_jax.flatness.study`): ``results.json``, the
tau table as markdown and CSV with the primary test at its head, and the primary scatter."""

from __future__ import annotations

import csv
import json
import os

from flatfsc_jax.flatness import plots
from flatfsc_jax.reporting import atomic, correlation


def write_outputs(results: dict, out_dir: str) -> dict[str, str]:
    """``results.json``, ``table.md``, ``table.csv`` and the primary scatter, replacing the
    previous ones whole (``reporting.atomic.staged``). Returns their paths."""
    names = ("results.json", "table.md", "table.csv", f"scatter_{results['primary_measure']}.png")
    with atomic.staged(out_dir) as tmp:
        paths = (os.path.join(tmp, n) for n in names)
        staged = dict(zip(("json", "md", "csv", "scatter"), paths, strict=True))
        with open(staged["json"], "w") as f:
            json.dump(results, f, indent=1)
        with open(staged["md"], "w") as f:
            f.write(format_summary(results) + "\n" + correlation.to_markdown(results["rows"]))
        with open(staged["csv"], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(results["rows"][0]))
            writer.writeheader()
            writer.writerows(results["rows"])
        plots.plot_scatter(results, staged["scatter"])
    return {n: os.path.join(out_dir, n) for n in names}


def format_summary(results: dict) -> str:
    """The primary test in one paragraph (the head of ``table.md``)."""
    p = results["primary"]
    head = (
        f"Primary (named before the run): {results['primary_measure']} vs "
        f"{results['primary_outcome']}, n = {results['n']} backbones; detectable at p < .05: "
        f"|tau| >= {results['min_detectable_tau']:.2f}; with {results['n_perm']} "
        f"permutations and {len(results['rows'])} tests, no Holm-adjusted p can fall below "
        f"{results['holm_floor']:.3f}.\n"
    )
    if results.get("diverged"):
        head += f"Diverged in training, left out: {', '.join(results['diverged'])}.\n"
    if p is None:
        return head + f"The primary measure was dropped: {results['dropped_measures']}.\n"
    t = p["tau"]
    return head + (
        f"tau_b = {t['tau']:+.3f}, 95% BCa CI [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}], "
        f"permutation p = {t['p']:.3f}; granulated Psi = {p['granulated']['psi']:+.3f}; "
        f"pooled within-optimiser tau = {p['groups']['pooled_within']['tau']:+.3f}; "
        f"sign-error = {p['sign_error']['error']:.3f} over {p['sign_error']['kept']} pairs.\n"
    )
