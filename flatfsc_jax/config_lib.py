"""Building blocks of the experiment configs in ``configs/`` and their validation.

Configs are Python files whose ``get_config(arg)`` returns an ``ml_collections.ConfigDict``
(big_vision style); this module holds what they share: the paper's per-domain table
(design.md §2), the Glyphs table, the default sub-configs, and ``validate``, which checks
every key a run uses *before anything is compiled* and names the key when it is wrong.

Per-domain hyper-parameters. A config names the domains it trains (``config.domains``)
and carries a table ``config.per_domain.<domain>`` (batch_size, lr, num_steps,
restart_period, rho). With exactly one domain (``configs/sam_resnet18.py:omniglot``) the
top-level keys (``config.batch_size``, ``config.sam.rho``, ...) are authoritative, so
``--config.sam.rho=0.1`` does what it says. With several domains (``:all``) each domain
runs with its table row: override one with ``--config.per_domain.omniglot.rho=0.1``.
"""

from __future__ import annotations

import math

import ml_collections

# design.md §2: batch, lr, iterations, restart period T0, SAM rho per Meta-Dataset domain.
META_DATASET_TABLE = {
    "ilsvrc_2012": dict(batch_size=64, lr=3e-2, num_steps=480_000, restart_period=48_000, rho=0.05),
    "omniglot": dict(batch_size=16, lr=3e-2, num_steps=50_000, restart_period=3_000, rho=0.01),
    "aircraft": dict(batch_size=8, lr=3e-2, num_steps=50_000, restart_period=3_000, rho=0.1),
    "cu_birds": dict(batch_size=16, lr=3e-2, num_steps=50_000, restart_period=3_000, rho=0.1),
    "dtd": dict(batch_size=32, lr=3e-2, num_steps=50_000, restart_period=1_500, rho=0.05),
    "quickdraw": dict(batch_size=64, lr=1e-2, num_steps=480_000, restart_period=48_000, rho=0.05),
    "fungi": dict(batch_size=32, lr=3e-2, num_steps=480_000, restart_period=15_000, rho=0.05),
    "vgg_flower": dict(batch_size=8, lr=3e-2, num_steps=50_000, restart_period=1_500, rho=0.1),
}
META_DATASET_SEEN = tuple(META_DATASET_TABLE)
META_DATASET_UNSEEN = ("traffic_sign", "mscoco", "mnist", "cifar10", "cifar100")

METHODS = ("erm", "sam")
BENCHMARKS = ("glyphs", "meta_dataset")
ADAPTATIONS = ("ncc", "pa", "finetune", "lora", "tsa")


def base_config() -> ml_collections.ConfigDict:
    """Every key a run reads, with the paper's defaults (Meta-Dataset, ResNet-18)."""
    c = ml_collections.ConfigDict()
    c.benchmark = "meta_dataset"
    c.data_dir = ""  # "" -> $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.domains = ("omniglot",)
    c.methods = ("sam",)  # backbone training methods to put in the zoo
    c.seed = 0
    c.retrain = False  # True: retrain zoo entries that are already complete

    c.model = ml_collections.ConfigDict(
        dict(arch="resnet18", width=1.0, dtype="float32", lora_rank=0)
    )

    # Single-domain hyper-parameters (authoritative when len(domains) == 1).
    c.batch_size = 16
    c.lr = 3e-2
    c.num_steps = 50_000
    c.restart_period = 3_000
    c.momentum = 0.9
    c.weight_decay = 7e-4
    c.label_smoothing = 0.0
    c.sam = ml_collections.ConfigDict(dict(rho=0.05, adaptive=False, m=0, eps=1e-12))
    c.per_domain = ml_collections.ConfigDict()

    # design.md §2 augmentation; pad is 8 px at 84 px.
    c.augment = ml_collections.ConfigDict(
        dict(enabled=True, pad=8, contrast=0.2, saturation=0.2, hue=0.03, brightness=0.125)
    )

    # Validation during training: NCC (10 x cosine) on frozen embeddings.
    c.validation = ml_collections.ConfigDict(
        dict(every=0, episodes=300, metric="cosine", batch_size=256)
    )  # every=0 -> every restart period (the paper)
    c.checkpoint_every = 1_000
    c.log_every = 100

    # Information fusion by fine-tuning the general domain's backbone (design.md §2).
    c.fusion = ml_collections.ConfigDict(
        dict(
            enabled=False,
            source_domain="ilsvrc_2012",
            mode="full",  # "full" or "lora"
            lora_rank=8,
            num_steps=10_000,
            lr=3e-3,
            restart_period=10_000,
        )
    )

    # Few-shot evaluation on seen + unseen domains.
    c.evaluation = ml_collections.ConfigDict(
        dict(
            enabled=True,
            domains=META_DATASET_SEEN + META_DATASET_UNSEEN,
            episodes=600,
            metric="cosine",
            adaptations=("ncc",),
            finetune_episodes=600,  # episodes for the (slower) fine-tuning adaptations
            finetune_families=(),  # families fine-tuned at test time; () = all
            finetune_steps=40,
            finetune_lr=0.0,  # 0 -> adapt.py's documented default for the mode
            lora_rank=4,
            # PA (pa.py) on cached embeddings; 0 -> all ``episodes``.
            pa_episodes=0,
            pa_steps=40,
            # TSA (tsa.py) costs ~40 backbone passes per task, like fine-tuning.
            tsa_episodes=600,
            tsa_steps=40,
            parc_support=True,  # unseen domains: pick the backbone per task with PARC
            parc_max_support=0,  # > 0: PARC on a random subset of this many support images
        )
    )
    return c


def with_table(c: ml_collections.ConfigDict, table: dict, domains) -> ml_collections.ConfigDict:
    """Fills ``per_domain`` from ``table`` and, for one domain, the top-level keys."""
    domains = tuple(domains)
    for d in domains:
        if d not in table:
            raise ValueError(f"domain {d!r} is unknown; choose one of {tuple(table)} or 'all'")
    c.domains = domains
    c.per_domain = ml_collections.ConfigDict({d: dict(table[d]) for d in domains})
    if len(domains) == 1:
        row = table[domains[0]]
        c.batch_size, c.lr = row["batch_size"], row["lr"]
        c.num_steps, c.restart_period = row["num_steps"], row["restart_period"]
        c.sam.rho = row["rho"]
    return c


def parse_domain_arg(arg: str | None, table: dict, default: str) -> tuple[str, ...]:
    """``None``/``""`` -> default; ``"all"`` -> every domain; ``"a,b"`` -> those."""
    arg = arg or default
    if arg == "all":
        return tuple(table)
    return tuple(a for a in arg.split(",") if a)


def meta_dataset_config(method: str, arg: str | None) -> ml_collections.ConfigDict:
    """The paper's Meta-Dataset job for ``method``: one domain, several, or ``all``.

    With all eight seen domains it also fuses (from ImageNet) and evaluates on all 13.
    """
    c = base_config()
    c.benchmark = "meta_dataset"
    c.methods = (method,)
    domains = parse_domain_arg(arg, META_DATASET_TABLE, "all")
    with_table(c, META_DATASET_TABLE, domains)
    c.model.arch, c.model.width = "resnet18", 1.0
    everything = len(domains) == len(META_DATASET_TABLE)
    c.fusion.enabled = everything
    c.fusion.source_domain = "ilsvrc_2012"
    c.evaluation.enabled = everything
    c.evaluation.domains = META_DATASET_SEEN + META_DATASET_UNSEEN
    c.evaluation.adaptations = ("ncc", "pa", "finetune", "tsa")
    return c


def domain_config(config: ml_collections.ConfigDict, domain: str, method: str):
    """The effective single-domain, single-method config of one zoo entry."""
    c = ml_collections.ConfigDict(config.to_dict())
    if len(config.domains) > 1:
        row = config.per_domain[domain]
        c.batch_size, c.lr = row.batch_size, row.lr
        c.num_steps, c.restart_period = row.num_steps, row.restart_period
        c.sam.rho = row.rho
    if method == "erm":
        c.sam.rho = 0.0
    c.domains = (domain,)
    c.methods = (method,)
    c.lock()
    return c


def _finite_positive(value, key):
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"config.{key} must be a finite number > 0, got {value!r}")


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Raises ``ValueError`` naming the first bad key; cheap, run before compiling."""
    from flatfsc_jax import models

    if config.benchmark not in BENCHMARKS:
        raise ValueError(f"config.benchmark={config.benchmark!r} is unknown; choose {BENCHMARKS}")
    for m in config.methods:
        if m not in METHODS:
            raise ValueError(f"config.methods has {m!r}; each must be one of {METHODS}")
    if config.model.arch not in models.ARCHITECTURES:
        raise ValueError(
            f"config.model.arch={config.model.arch!r} is unknown; choose one of "
            f"{models.ARCHITECTURES}"
        )
    _finite_positive(config.model.width, "model.width")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ValueError(
            f"config.model.dtype must be float32 or bfloat16, got {config.model.dtype!r}"
        )
    rows = [("", config)] if len(config.domains) == 1 else []
    rows += [
        (f"per_domain.{d}.", config.per_domain[d])
        for d in config.domains
        if len(config.domains) > 1
    ]
    for prefix, row in rows:
        rho = row.sam.rho if prefix == "" else row.rho
        rho_key = "sam.rho" if prefix == "" else prefix + "rho"
        if not isinstance(rho, int | float) or not math.isfinite(rho) or rho < 0:
            raise ValueError(f"config.{rho_key} must be a finite number >= 0, got {rho!r}")
        _finite_positive(row.lr, prefix + "lr")
        for key in ("batch_size", "num_steps", "restart_period"):
            value = row[key]
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.{prefix}{key} must be a positive integer, got {value!r}")
        if row.batch_size % num_devices:
            raise ValueError(
                f"config.{prefix}batch_size={row.batch_size} is not divisible by the "
                f"{num_devices} devices of the mesh; use a multiple of {num_devices}"
            )
        m = config.sam.m
        if m and row.batch_size % m:
            raise ValueError(
                f"config.{prefix}batch_size={row.batch_size} is not divisible by "
                f"config.sam.m={m} (m-sharpness chunks)"
            )
    if config.sam.m < 0:
        raise ValueError(f"config.sam.m must be >= 0 (0 = whole batch), got {config.sam.m!r}")
    if config.validation.episodes <= 0:
        raise ValueError(
            f"config.validation.episodes must be > 0, got {config.validation.episodes}"
        )
    if config.validation.metric not in ("cosine", "euclidean"):
        raise ValueError("config.validation.metric must be cosine or euclidean")
    for a in config.evaluation.adaptations:
        if a not in ADAPTATIONS:
            raise ValueError(f"config.evaluation.adaptations has {a!r}; choose from {ADAPTATIONS}")
    for key in ("pa_episodes", "pa_steps", "tsa_episodes", "tsa_steps"):
        value = config.evaluation.get(key, 0)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"config.evaluation.{key} must be an integer >= 0, got {value!r}")
    if config.fusion.mode not in ("full", "lora"):
        raise ValueError(f"config.fusion.mode must be 'full' or 'lora', got {config.fusion.mode!r}")
