"""The paper's Meta-Dataset table in one command: ERM and SAM, both fusions, 8 + 5 domains.

Command:

  ./run.sh --config=configs/paper.py --workdir=/ckpt/flatfsc
  ./run.sh --config=configs/paper.py --workdir=/ckpt/flatfsc --dry_run   # the plan, no work
  ./run.sh --config=configs/paper.py --config.evaluation.episode_spec=5shot ...

One job, the paper's whole Table: 16 backbones (ERM and SAM on each of the 8 seen
domains, per-domain recipe of ``configs/meta_dataset_table.py``), fusion by fine-tuning
from ImageNet (the paper's fusion, 7 x 2 entries) and by distillation (URL's recipe, one
student per method), then NCC, PA, fine-tuning and TSA on all 13 test domains with
PARC picking the backbone on unseen ones. Every entry is resumable and reused by the
zoo, so the same command picks up after a kill; ``--shard=i/n`` splits training over
hosts (docs/scale.md#one-process-per-gpu).

Needs the 13 Meta-Dataset sources prepared (docs/meta-dataset.md); the run stops at once
and lists what is missing.

Expected cost, *estimates* from measured H200 step rates
(docs/scale.md#cost-of-the-full-reproduction): training 7.8 h on one H200 (1.6 h on 8),
fine-tuning fusion 0.26 h, embedding <= 0.6 h, test-time fine-tuning and TSA <= 9.2 h
each. Distillation is not in that table: each student sees 240k x (448 + 7 x 64) = 215M
images, and the 8 teachers embed each of them.
Expected result (the paper, 600 episodes, average accuracy seen / unseen; README.md):
ERM 75.99 / 76.84, SAM 77.67 / 78.56, ERM + distillation 80.15 / 76.24, SAM + distillation
80.64 / 77.23, ERM + fine-tuning fusion 80.02 / 76.92, SAM + fine-tuning fusion
81.75 / 78.64.
"""

from flatfsc_jax import config_lib

# Loaded by path, like this file: configs/ is not an installed package.
meta_dataset_table = config_lib.sibling_module(__file__, "meta_dataset_table")


def get_config(arg=None):
    if arg:
        raise ValueError(
            f"configs/paper.py takes no argument (got {arg!r}); for one domain or method use "
            "configs/sam_resnet18.py:<domain> or configs/erm_resnet18.py:<domain>"
        )
    c = meta_dataset_table.meta_dataset_config("erm", "all")
    c.methods = ("erm", "sam")
    c.fusion.mode = "full,distill"
    return c
