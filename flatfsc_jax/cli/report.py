"""Command line: ``python -m flatfsc_jax.cli.report --workdir=work``.

Re-renders ``<workdir>/report/`` (report.md, report.csv, headline.png) from
``<workdir>/report/results.json``, which the evaluate stage of ``./run.sh`` writes.
"""

from __future__ import annotations

import os

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "work", "The run's workdir (report in <workdir>/report).")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    from flatfsc_jax import errors, lock
    from flatfsc_jax.reporting import tables

    out = os.path.join(_WORKDIR.value, "report")
    try:
        results = tables.read_results(os.path.join(out, "results.json"))
        with lock.workdir_lock(_WORKDIR.value):
            paths = tables.write_report(results, out)
    except errors.FlatfscError as e:
        raise SystemExit(f"error: {e}") from e
    print(tables.to_markdown(results))
    print("written:", ", ".join(paths.values()))


if __name__ == "__main__":
    app.run(main)
