"""Command line: the flatness study (:mod:`flatfsc_jax.flatness.study`).

    python -m flatfsc_jax.cli.flatness_study --config=configs/flatness_study.py --workdir=study
        [--stages=train,measure,evaluate,analyse] [--config.study.<key>=<value>]

Resumable: re-run the same command and every finished backbone, measurement and
evaluation is kept. Writes ``<workdir>/study/{results.json, table.md, table.csv,
scatter_<measure>.png}`` (docs/flatness-transfer.md).
"""

from flatfsc_jax.cli import driver


def _run():
    from flatfsc_jax.flatness import study

    return study.run


if __name__ == "__main__":
    driver.main_for("configs/flatness_study.py", "study", _run)
