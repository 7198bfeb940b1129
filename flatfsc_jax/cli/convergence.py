"""Draws the validation curves of any zoo: ``python -m flatfsc_jax.cli.convergence``.

  python -m flatfsc_jax.cli.convergence --zoo=work/zoo --out=curves.png \
      [--benchmark=glyphs] [--budget=cjk=2000 --budget=latin=500] [--title=...]

One panel per domain, a line per method (``convergence.plot_convergence``); each
``--budget=domain=steps`` draws that domain's budget as a dashed line. The main job draws
the same figure for its own zoo (``<workdir>/report/convergence.png``).
"""

from __future__ import annotations

import os

from absl import app, flags

from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.reporting import convergence

_ZOO = flags.DEFINE_string("zoo", "work/zoo", "Zoo root (default work/zoo).")
_OUT = flags.DEFINE_string("out", "convergence.png", "Where the PNG goes.")
_BENCHMARK = flags.DEFINE_string("benchmark", None, "Only this benchmark's entries.")
_BUDGET = flags.DEFINE_multi_string("budget", [], "domain=steps: draw a budget line.")
_TITLE = flags.DEFINE_string("title", "", "Figure title.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    budgets = {}
    for item in _BUDGET.value:
        domain, _, steps = item.partition("=")
        budgets[domain] = int(steps)
    out = _OUT.value
    curves = convergence.read_curves(zoo_lib.Zoo(_ZOO.value), _BENCHMARK.value)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    convergence.plot_convergence(curves, out, budgets=budgets, title=_TITLE.value)
    print(f"written: {out} ({len(curves)} domains)")


if __name__ == "__main__":
    app.run(main)
