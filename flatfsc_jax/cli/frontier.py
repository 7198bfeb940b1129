"""Command line: the cost-flatness-transfer frontier (:mod:`flatfsc_jax.flatness.frontier`).

    python -m flatfsc_jax.cli.frontier --config=configs/frontier.py --workdir=frontier
        [--stages=train,measure,evaluate,analyse] [--config.frontier.seeds=5]

Resumable: re-run the same command and every finished backbone, measurement and
evaluation is kept. Writes ``<workdir>/frontier/{results.json, table.md, frontier.png}``
(docs/frontier.md).
"""

from flatfsc_jax.cli import driver


def _run():
    from flatfsc_jax.flatness import frontier

    return frontier.run


if __name__ == "__main__":
    driver.main_for("configs/frontier.py", "frontier", _run)
