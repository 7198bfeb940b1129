"""Lists a backbone zoo: ``python -m flatfsc_jax.cli.zoo --zoo=work/zoo [--benchmark=glyphs]``.

One line per complete entry (arch, steps, rho, best validation accuracy; ``zoo.format_listing``);
broken entries are skipped with a warning, as ``Zoo.list`` does. Pointing ``--zoo`` at a
workdir instead of its ``zoo/`` is an error that names the right path.
"""

from __future__ import annotations

import logging

from absl import app, flags

from flatfsc_jax import zoo as zoo_lib

_ZOO = flags.DEFINE_string("zoo", "work/zoo", "Zoo root (default work/zoo).")
_BENCHMARK = flags.DEFINE_string("benchmark", None, "Only this benchmark's entries.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    # Warnings (skipped entries) are for the user; absl's INFO logs of libraries are not.
    logging.getLogger().setLevel(logging.WARNING)
    zoo = zoo_lib.Zoo(_ZOO.value)
    if not zoo.root.is_dir():
        raise SystemExit(f"error: --zoo={_ZOO.value}: no such directory")
    nested = zoo.root / "zoo"
    if nested.is_dir() and not any((zoo.root / b).is_dir() for b in ("glyphs", "meta_dataset")):
        raise SystemExit(f"error: --zoo={_ZOO.value} is a workdir, not a zoo: use --zoo={nested}")
    print(zoo_lib.format_listing(zoo.list(_BENCHMARK.value)))


if __name__ == "__main__":
    app.run(main)
