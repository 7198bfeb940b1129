"""SAM ResNet-18 backbones on Meta-Dataset: the paper's full job (GPU/TPU).

Command (one domain, or ``all`` eight seen domains in sequence; default ``all``):

  ./run.sh --config=configs/sam_resnet18.py:omniglot --workdir=/ckpt/flatfsc
  ./run.sh --config=configs/sam_resnet18.py --workdir=/ckpt/flatfsc   # all + fusion + eval
  ./run.sh --config=configs/sam_resnet18.py:omniglot --config.per_domain.omniglot.rho=0.1
  ./run.sh --config=configs/sam_resnet18.py:miniature --config.data_dir=<prepared miniature>

``:miniature`` is the same job shrunk for the miniature Meta-Dataset of
docs/meta-dataset.md#the-miniature (tests/system/test_md_miniature.py): two training
domains (Omniglot, DTD) of 4 steps at width 1/8, the classes each source was prepared
with (``config.data.class_splits="prepared"``), NCC on all 13 test domains with 6
episodes, no fusion.

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
Expected result (paper, Meta-Dataset, 600 episodes, NCC on SAM backbones): seen average
77.67%, unseen 78.56%; with fine-tuning fusion (SAM+FT) 81.75% / 78.64%.
"""

from flatfsc_jax import config_lib

# Loaded by path, like this file: configs/ is not an installed package.
meta_dataset_table = config_lib.sibling_module(__file__, "meta_dataset_table")


MINIATURE_DOMAINS = ("omniglot", "dtd")


def get_config(arg=None):
    if arg != "miniature":
        return meta_dataset_table.meta_dataset_config("sam", arg)
    c = meta_dataset_table.meta_dataset_config("sam", ",".join(MINIATURE_DOMAINS))
    config_lib.with_table(
        c,
        {
            d: dict(meta_dataset_table.TABLE[d], batch_size=4, num_steps=4, restart_period=4)
            for d in MINIATURE_DOMAINS
        },
        MINIATURE_DOMAINS,
    )
    c.data.class_splits = "prepared"
    c.model.width = 0.125
    c.validation.episodes = 2
    c.validation.every = 4
    c.validation.batch_size = 64
    c.checkpoint_every = c.log_every = 4
    c.evaluation.enabled = True
    c.evaluation.adaptations = ("ncc",)
    c.evaluation.episodes = 6
    return c
