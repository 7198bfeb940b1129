"""ERM ResNet-18 backbones on Meta-Dataset: the paper's baseline (identical recipe, rho = 0).

Command (one domain, or ``all`` eight seen domains in sequence; default ``all``):

  ./run.sh --config=configs/erm_resnet18.py:omniglot --workdir=/ckpt/flatfsc
  ./run.sh --config=configs/erm_resnet18.py --workdir=/ckpt/flatfsc   # all + fusion + eval
  ./run.sh --config=configs/erm_resnet18.py:omniglot --config.per_domain.omniglot.lr=0.01

Needs the Meta-Dataset sources prepared with ``python -m flatfsc_jax.cli.prepare``
(the run stops at once and lists what is missing). Per-domain batch size, learning rate,
iterations, restart period and rho are the paper's table (``configs/meta_dataset_table.py``;
docs/design.md#recipe says where each value comes from). Every domain, alone or with
others, trains with its row: override it with ``--config.per_domain.<domain>.rho=...``
(the top-level ``--config.sam.rho``, ``lr``, ``batch_size``, ``num_steps`` and
``restart_period`` would be ignored, so they are errors that name the ``per_domain`` key).
``--dry_run`` prints every entry's effective values.

Expected cost: 80.8M training images per method over the 8 domains; ~48 (ERM) / ~84 (SAM)
days on a 2-core CPU where ``bench/step.py`` runs this ResNet-18 at 19.4 / 11.1 img/s
(measured step rate), an *estimated* ~4 / ~8 hours on one accelerator sustaining
30 TFLOP/s (docs/benchmarks.md#expected-cost-of-the-papers-full-job).
Expected result (paper, Meta-Dataset, 600 episodes, NCC on ERM backbones): seen average
75.99%, unseen 76.84%; with fine-tuning fusion (ERM+FT) 80.02% / 76.92%.
"""

from flatfsc_jax import config_lib

# Loaded by path, like this file: configs/ is not an installed package.
meta_dataset_table = config_lib.sibling_module(__file__, "meta_dataset_table")


def get_config(arg=None):
    return meta_dataset_table.meta_dataset_config("erm", arg)
