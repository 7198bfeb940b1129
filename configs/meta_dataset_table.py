"""The paper's Meta-Dataset recipe, shared by ``sam_resnet18.py`` and ``erm_resnet18.py``.

Not a config file itself (no ``get_config``): the per-domain hyper-parameter table of
the paper and the job built from it for one training method.
"""

from flatfsc_jax import config_lib

# the paper: batch, lr, iterations, restart period T0, SAM rho per Meta-Dataset domain.
TABLE = {
    "ilsvrc_2012": dict(batch_size=64, lr=3e-2, num_steps=480_000, restart_period=48_000, rho=0.05),
    "omniglot": dict(batch_size=16, lr=3e-2, num_steps=50_000, restart_period=3_000, rho=0.01),
    "aircraft": dict(batch_size=8, lr=3e-2, num_steps=50_000, restart_period=3_000, rho=0.1),
    "cu_birds": dict(batch_size=16, lr=3e-2, num_steps=50_000, restart_period=3_000, rho=0.1),
    "dtd": dict(batch_size=32, lr=3e-2, num_steps=50_000, restart_period=1_500, rho=0.05),
    "quickdraw": dict(batch_size=64, lr=1e-2, num_steps=480_000, restart_period=48_000, rho=0.05),
    "fungi": dict(batch_size=32, lr=3e-2, num_steps=480_000, restart_period=15_000, rho=0.05),
    "vgg_flower": dict(batch_size=8, lr=3e-2, num_steps=50_000, restart_period=1_500, rho=0.1),
}
# URL's annealing lengths k_d in restart periods (config.py KDANNEALING): 5 for the
# general domain, 2 for these three, 1 for every other domain.
URL_KD_ANNEALING_2 = ("omniglot", "quickdraw", "fungi")


def meta_dataset_config(method: str, arg: str | None):
    """The paper's Meta-Dataset job for ``method``: one domain, several, or ``all``.

    With all eight seen domains it also fuses (from ImageNet) and evaluates on all 13.
    """
    c = config_lib.base_config()
    c.benchmark = "meta_dataset"
    c.methods = (method,)
    domains = config_lib.parse_domain_arg(arg, TABLE, "all")
    config_lib.with_table(c, TABLE, domains)
    c.model.arch, c.model.width = "resnet18", 1.0
    everything = len(domains) == len(TABLE)
    c.fusion.enabled = everything
    c.fusion.source_domain = "ilsvrc_2012"
    # URL (scripts/train_resnet18_url.sh, config.py): 240k iterations, restarts every 48k,
    # lr 3e-2, batch 448 for ImageNet and 64 for each other domain.
    config_lib.set_distill_recipe(
        c,
        num_steps=240_000,
        restart_period=48_000,
        lr=3e-2,
        general_batch_size=448,
        other_batch_size=64,
        anneal_2=URL_KD_ANNEALING_2,
    )
    c.evaluation.enabled = everything
    c.evaluation.domains = config_lib.META_DATASET_SEEN + config_lib.META_DATASET_UNSEEN
    c.evaluation.adaptations = ("ncc", "pa", "finetune", "tsa")
    return c
