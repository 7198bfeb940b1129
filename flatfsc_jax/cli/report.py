"""Command line: ``python -m flatfsc_jax.cli.report --workdir=work``.

Re-renders ``<workdir>/report/`` (report.md, report.csv, headline.png) from
``<workdir>/report/results.json``, which the evaluate stage of ``./run.sh`` writes.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "work", "The run's workdir (report in <workdir>/report).")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    from flatfsc_jax.reporting import tables

    out = os.path.join(_WORKDIR.value, "report")
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        raise SystemExit(f"{path} does not exist: run ./run.sh (its evaluate stage) first")
    with open(path) as f:
        results = json.load(f)
    paths = tables.write_report(results, out)
    print(tables.to_markdown(results))
    print("written:", ", ".join(paths.values()))


if __name__ == "__main__":
    app.run(main)
