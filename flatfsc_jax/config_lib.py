"""Building blocks of the experiment configs in ``configs/`` and their validation.

Configs are Python files whose ``get_config(arg)`` returns an ``ml_collections.ConfigDict``
(big_vision style); this module holds what they share: the paper's per-domain table
(the paper), the Glyphs table, the default sub-configs, and ``validate``, which checks
every key a run uses *before anything is compiled* and names the key when it is wrong.

Per-domain hyper-parameters: one meaning per key. A config names the domains it trains
(``config.domains``) and carries a table row ``config.per_domain.<domain>`` (batch_size,
lr, num_steps, restart_period, rho) for each; a domain *always* trains with its row,
whether one domain or several are trained. Override a row with
``--config.per_domain.omniglot.rho=0.1``. The top-level ``config.batch_size``, ``lr``,
``num_steps``, ``restart_period`` and ``sam.rho`` are unset (``None``) in a run's config;
``domain_config`` fills them from the row to give the effective config of one zoo entry
(what ``metadata.json`` stores). Setting one of them on the command line would be ignored,
so it is an error naming the ``per_domain`` key to use instead.
"""

from __future__ import annotations

import math

import ml_collections
from ml_collections.config_dict import placeholder

# the paper: batch, lr, iterations, restart period T0, SAM rho per Meta-Dataset domain.
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
FUSION_MODES = ("full", "lora", "distill")
# URL's annealing lengths k_d in restart periods (config.py KDANNEALING): 5 for the
# general domain, 2 for these three, 1 for every other domain.
URL_KD_ANNEALING_2 = ("omniglot", "quickdraw", "fungi")
BENCHMARKS = ("glyphs", "meta_dataset")
ADAPTATIONS = ("ncc", "pa", "finetune", "lora", "tsa")

# Top-level key -> key of a per-domain row. The top-level keys are set only in the
# effective config of one zoo entry (``domain_config``), never in a run's config.
ROW_KEYS = {
    "batch_size": "batch_size",
    "lr": "lr",
    "num_steps": "num_steps",
    "restart_period": "restart_period",
    "sam.rho": "rho",
}


class ConfigError(ValueError):
    """A config key has a wrong value; the message names the key and the fix."""


def benchmark_domains(benchmark: str) -> tuple[str, ...]:
    """Every domain (seen and unseen) the data of ``benchmark`` has."""
    if benchmark == "glyphs":
        from flatfsc_jax.data import glyphs_render  # numpy only: cheap

        return glyphs_render.DOMAINS
    return META_DATASET_SEEN + META_DATASET_UNSEEN


def base_config() -> ml_collections.ConfigDict:
    """Every key a run reads, with the paper's defaults (Meta-Dataset, ResNet-18)."""
    c = ml_collections.ConfigDict()
    c.benchmark = "meta_dataset"
    c.data_dir = ""  # "" -> $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.domains = ("omniglot",)
    c.methods = ("sam",)  # backbone training methods to put in the zoo
    c.seed = 0
    c.retrain = False  # True: retrain zoo entries that are already complete

    # head_classes > 0 pads every domain's classification head to that many classes
    # (masked logits) so all domains share one compiled training step (train.py); 0
    # gives each domain its own head width (and its own compilation).
    c.model = ml_collections.ConfigDict(
        dict(arch="resnet18", width=1.0, dtype="float32", lora_rank=0, head_classes=0)
    )

    # Per-entry hyper-parameters live in config.per_domain.<domain> (see the module
    # docstring); these stay None in a run's config and are filled by domain_config.
    c.batch_size = placeholder(int)
    c.lr = placeholder(float)
    c.num_steps = placeholder(int)
    c.restart_period = placeholder(int)
    c.momentum = 0.9
    c.weight_decay = 7e-4
    c.label_smoothing = 0.0
    c.sam = ml_collections.ConfigDict(dict(adaptive=False, m=0, eps=1e-12))
    c.sam.rho = placeholder(float)  # per_domain.<domain>.rho (0 for ERM entries)
    c.per_domain = ml_collections.ConfigDict()

    # the paper augmentation; pad is 8 px at 84 px.
    c.augment = ml_collections.ConfigDict(
        dict(enabled=True, pad=8, contrast=0.2, saturation=0.2, hue=0.03, brightness=0.125)
    )

    # Validation during training: NCC (10 x cosine) on frozen embeddings.
    c.validation = ml_collections.ConfigDict(
        dict(every=0, episodes=300, metric="cosine", batch_size=256)
    )  # every=0 -> every restart period (the paper)
    c.checkpoint_every = 1_000
    c.log_every = 100

    # Information fusion by fine-tuning the general domain's backbone (the paper).
    c.fusion = ml_collections.ConfigDict(
        dict(
            enabled=False,
            source_domain="ilsvrc_2012",
            # "full", "lora", "distill" or a comma-separated combination ("full,distill")
            mode="full",
            lora_rank=8,
            num_steps=10_000,
            lr=3e-3,
            restart_period=10_000,
            # Fusion by distillation (URL; flatfsc_jax/distill.py). The per-domain tables
            # (batch_size, lambda_f, lambda_p, anneal) are filled by set_distill_recipe.
            distill=dict(
                num_steps=240_000,
                restart_period=48_000,
                lr=3e-2,
                adaptor_lr=0.1,
                adaptor_weight_decay=5e-4,
                temperature=4.0,
                validation_every=0,  # 0 -> every restart period (URL)
                batch_size={},
                lambda_f={},
                lambda_p={},
                anneal={},
            ),
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
            # Test episodes and PARC subsets; independent of config.seed (training), so
            # every training seed is evaluated on the same episodes.
            seed=0,
        )
    )
    return c


def with_table(c: ml_collections.ConfigDict, table: dict, domains) -> ml_collections.ConfigDict:
    """Sets ``domains`` and fills ``per_domain`` with their rows of ``table``."""
    domains = tuple(domains)
    for d in domains:
        if d not in table:
            raise ConfigError(f"domain {d!r} is unknown; choose one of {tuple(table)} or 'all'")
    c.domains = domains
    c.per_domain = ml_collections.ConfigDict({d: dict(table[d]) for d in domains})
    return c


def set_distill_recipe(
    c: ml_collections.ConfigDict,
    *,
    num_steps: int,
    restart_period: int,
    lr: float,
    general_batch_size: int,
    other_batch_size: int,
    anneal_2: tuple[str, ...] = (),
) -> ml_collections.ConfigDict:
    """Fills ``c.fusion.distill`` with URL's recipe for ``c.domains``.

    The general domain (``c.fusion.source_domain``) gets the large batch, lambda_f =
    lambda_p = 4 and annealing length k = 5 restart periods; the domains in ``anneal_2``
    k = 2; every other domain batch ``other_batch_size``, lambdas 1 and k = 1.
    """
    d = c.fusion.distill
    src = c.fusion.source_domain
    d.num_steps, d.restart_period, d.lr = num_steps, restart_period, lr
    d.batch_size = ml_collections.ConfigDict(
        {x: general_batch_size if x == src else other_batch_size for x in c.domains}
    )
    d.lambda_f = ml_collections.ConfigDict({x: 4.0 if x == src else 1.0 for x in c.domains})
    d.lambda_p = ml_collections.ConfigDict({x: 4.0 if x == src else 1.0 for x in c.domains})
    d.anneal = ml_collections.ConfigDict(
        {x: 5.0 if x == src else (2.0 if x in anneal_2 else 1.0) for x in c.domains}
    )
    return c


def fusion_modes(config) -> tuple[str, ...]:
    """``config.fusion.mode`` as a tuple: ``"full,distill"`` -> ``("full", "distill")``."""
    return tuple(m.strip() for m in str(config.fusion.mode).split(",") if m.strip())


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
    # URL (scripts/train_resnet18_url.sh, config.py): 240k iterations, restarts every 48k,
    # lr 3e-2, batch 448 for ImageNet and 64 for each other domain.
    set_distill_recipe(
        c,
        num_steps=240_000,
        restart_period=48_000,
        lr=3e-2,
        general_batch_size=448,
        other_batch_size=64,
        anneal_2=URL_KD_ANNEALING_2,
    )
    c.evaluation.enabled = everything
    c.evaluation.domains = META_DATASET_SEEN + META_DATASET_UNSEEN
    c.evaluation.adaptations = ("ncc", "pa", "finetune", "tsa")
    return c


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def check_row_overrides(config: ml_collections.ConfigDict) -> None:
    """Rejects a top-level key that would be ignored because a domain has its own row.

    A top-level value equal to every trained domain's row changes nothing and passes (it
    is what ``domain_config`` produces for one entry).
    """
    for key, row_key in ROW_KEYS.items():
        value = _get(config, key)
        if value is None:
            continue
        ignored = [
            d
            for d in config.domains
            if d in config.per_domain and config.per_domain[d][row_key] != value
        ]
        if ignored:
            fixes = " ".join(f"--config.per_domain.{d}.{row_key}={value}" for d in ignored)
            raise ConfigError(
                f"config.{key}={value!r} would be ignored: every domain trains with its "
                f"table row config.per_domain.<domain>. Use {fixes} instead (and drop "
                f"--config.{key})"
            )


def domain_config(config: ml_collections.ConfigDict, domain: str, method: str):
    """The effective single-domain, single-method config of one zoo entry.

    The top-level batch_size / lr / num_steps / restart_period / sam.rho are the domain's
    row (rho 0 for ERM) and ``per_domain`` holds that row only, so the result describes
    the entry on its own (it is what ``metadata.json`` stores): a one-domain training
    job, so the run-level stages are off in it (``fusion.enabled``,
    ``evaluation.enabled``; the other fusion keys stay, they define fused entries).
    """
    check_row_overrides(config)
    if domain not in config.per_domain:
        raise ConfigError(
            f"domain {domain!r} has no table row config.per_domain.{domain}; trained domains "
            f"need one (rows: {tuple(config.per_domain)})"
        )
    c = ml_collections.ConfigDict(config.to_dict())
    row = ml_collections.ConfigDict(config.per_domain[domain].to_dict())
    if method == "erm":
        row.rho = 0.0
    c.batch_size, c.lr = row.batch_size, row.lr
    c.num_steps, c.restart_period = row.num_steps, row.restart_period
    c.sam.rho = row.rho
    c.per_domain = ml_collections.ConfigDict({domain: row.to_dict()})
    c.fusion.enabled = c.evaluation.enabled = False
    c.domains = (domain,)
    c.methods = (method,)
    c.lock()
    return c


def describe_entry(cfg: ml_collections.ConfigDict) -> str:
    """One line of an entry's effective hyper-parameters (``--dry_run``)."""
    return (
        f"batch {cfg.batch_size}, lr {cfg.lr:g}, steps {cfg.num_steps}, "
        f"restart period {cfg.restart_period}, rho {cfg.sam.rho:g}"
    )


def _finite_positive(value, key):
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"config.{key} must be a finite number > 0, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"config.{key} must be a finite number > 0, got {value!r}")


def _positive_int(value, key, *, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"config.{key} must be {what}, got {value!r}")


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Raises ``ConfigError`` naming the first bad key; cheap, run before compiling.

    Checks every key a run reads: benchmark, domains and their table rows, methods,
    model, SAM, validation, checkpoint/log intervals, fusion and evaluation settings.
    """
    from flatfsc_jax import models

    if config.benchmark not in BENCHMARKS:
        raise ConfigError(f"config.benchmark={config.benchmark!r} is unknown; choose {BENCHMARKS}")
    known = benchmark_domains(config.benchmark)
    if not config.domains:
        raise ConfigError("config.domains is empty; name at least one domain to train")
    for d in config.domains:
        if d not in known:
            raise ConfigError(
                f"config.domains has {d!r}, not a {config.benchmark} domain; choose from {known}"
            )
        if d not in config.per_domain:
            raise ConfigError(
                f"config.domains has {d!r} but config.per_domain has no row for it (rows: "
                f"{tuple(config.per_domain)}); train a domain that has a row, or add one "
                f"with batch_size, lr, num_steps, restart_period and rho"
            )
    if not config.methods:
        raise ConfigError(f"config.methods is empty; choose from {METHODS}")
    for m in config.methods:
        if m not in METHODS:
            raise ConfigError(f"config.methods has {m!r}; each must be one of {METHODS}")
    if config.model.arch not in models.ARCHITECTURES:
        raise ConfigError(
            f"config.model.arch={config.model.arch!r} is unknown; choose one of "
            f"{models.ARCHITECTURES}"
        )
    _finite_positive(config.model.width, "model.width")
    head = config.model.get("head_classes", 0)
    if not isinstance(head, int) or isinstance(head, bool) or head < 0:
        raise ValueError(
            f"config.model.head_classes must be an integer >= 0 (0: no padding), got {head!r}"
        )
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(
            f"config.model.dtype must be float32 or bfloat16, got {config.model.dtype!r}"
        )
    if isinstance(config.sam.m, bool) or not isinstance(config.sam.m, int) or config.sam.m < 0:
        raise ConfigError(f"config.sam.m must be >= 0 (0 = whole batch), got {config.sam.m!r}")
    check_row_overrides(config)
    for d in config.domains:
        prefix, row = f"per_domain.{d}.", config.per_domain[d]
        rho = row.rho
        if isinstance(rho, bool) or not isinstance(rho, int | float) or not math.isfinite(rho):
            raise ConfigError(f"config.{prefix}rho must be a finite number >= 0, got {rho!r}")
        if rho < 0:
            raise ConfigError(f"config.{prefix}rho must be a finite number >= 0, got {rho!r}")
        _finite_positive(row.lr, prefix + "lr")
        for key in ("batch_size", "num_steps", "restart_period"):
            _positive_int(row[key], prefix + key)
        if row.batch_size % num_devices:
            raise ConfigError(
                f"config.{prefix}batch_size={row.batch_size} is not divisible by the "
                f"{num_devices} devices of the mesh; use a multiple of {num_devices}"
            )
        m = config.sam.m
        if m and row.batch_size % m:
            raise ConfigError(
                f"config.{prefix}batch_size={row.batch_size} is not divisible by "
                f"config.sam.m={m} (m-sharpness chunks)"
            )
    _positive_int(config.checkpoint_every, "checkpoint_every")
    _positive_int(config.log_every, "log_every")
    _positive_int(config.validation.episodes, "validation.episodes")
    _positive_int(config.validation.batch_size, "validation.batch_size")
    _positive_int(config.validation.every, "validation.every (0 = every restart period)", minimum=0)
    if config.validation.metric not in ("cosine", "euclidean"):
        raise ConfigError(
            "config.validation.metric must be cosine or euclidean, got "
            f"{config.validation.metric!r}"
        )
    f = config.fusion
    modes = fusion_modes(config)
    if not modes or any(m not in FUSION_MODES for m in modes) or len(set(modes)) < len(modes):
        raise ConfigError(
            f"config.fusion.mode must be one of {FUSION_MODES} or a comma-separated "
            f"combination of them (e.g. 'full,distill'), got {config.fusion.mode!r}"
        )
    if f.enabled:
        if f.source_domain not in config.domains:
            raise ConfigError(
                f"config.fusion.source_domain={f.source_domain!r} is not one of config.domains "
                f"{tuple(config.domains)}; fusion fine-tunes that domain's backbone on the "
                "others (or set --config.fusion.enabled=False)"
            )
        _finite_positive(f.lr, "fusion.lr")
        _positive_int(f.num_steps, "fusion.num_steps")
        _positive_int(f.restart_period, "fusion.restart_period")
        if "lora" in modes:
            _positive_int(f.lora_rank, "fusion.lora_rank")
    ev = config.evaluation
    for key in ("pa_episodes", "pa_steps", "tsa_episodes", "tsa_steps"):
        value = ev.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"config.evaluation.{key} must be an integer >= 0, got {value!r}")
    if ev.enabled:
        for d in ev.domains:
            if d not in known:
                raise ConfigError(
                    f"config.evaluation.domains has {d!r}, not a {config.benchmark} domain; "
                    f"choose from {known}"
                )
        _positive_int(ev.episodes, "evaluation.episodes")
        if ev.metric not in ("cosine", "euclidean"):
            raise ConfigError(
                f"config.evaluation.metric must be cosine or euclidean, got {ev.metric!r}"
            )
        for a in ev.adaptations:
            if a not in ADAPTATIONS:
                raise ConfigError(
                    f"config.evaluation.adaptations has {a!r}; choose from {ADAPTATIONS}"
                )
        if any(a != "ncc" for a in ev.adaptations):
            _positive_int(ev.finetune_steps, "evaluation.finetune_steps")
            _positive_int(ev.finetune_episodes, "evaluation.finetune_episodes", minimum=0)
            if "lora" in ev.adaptations:
                _positive_int(ev.lora_rank, "evaluation.lora_rank")
            lr = ev.finetune_lr
            if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr):
                raise ConfigError(
                    f"config.evaluation.finetune_lr must be a finite number >= 0 (0 = the "
                    f"default), got {lr!r}"
                )
            if lr < 0:
                raise ConfigError(
                    f"config.evaluation.finetune_lr must be a finite number >= 0, got {lr!r}"
                )
        _positive_int(ev.parc_max_support, "evaluation.parc_max_support (0 = all)", minimum=0)
    # A per-entry config (domain_config: one domain) trains one backbone, never a student.
    if config.fusion.enabled and "distill" in modes and len(config.domains) > 1:
        validate_distill(config, num_devices)


def validate_distill(config, num_devices: int = 1) -> None:
    """Checks ``config.fusion.distill`` for ``config.domains``; ``ValueError`` names the key."""
    d = config.fusion.distill
    src = config.fusion.source_domain
    if src not in config.domains:
        raise ConfigError(
            f"config.fusion.source_domain={src!r} is not one of config.domains "
            f"{tuple(config.domains)}; distillation needs the general domain's teacher"
        )
    for key in ("num_steps", "restart_period"):
        if not isinstance(d[key], int) or d[key] <= 0:
            raise ConfigError(
                f"config.fusion.distill.{key} must be a positive integer, got {d[key]!r}"
            )
    for key in ("lr", "adaptor_lr", "temperature"):
        _finite_positive(d[key], f"fusion.distill.{key}")
    wd = d.adaptor_weight_decay
    if not isinstance(wd, int | float) or not math.isfinite(wd) or wd < 0:
        raise ConfigError(
            f"config.fusion.distill.adaptor_weight_decay must be a finite number >= 0, got {wd!r}"
        )
    if not isinstance(d.validation_every, int) or d.validation_every < 0:
        raise ConfigError(
            "config.fusion.distill.validation_every must be an integer >= 0 (0: every "
            f"restart period), got {d.validation_every!r}"
        )
    for table in ("batch_size", "lambda_f", "lambda_p", "anneal"):
        for domain in config.domains:
            key = f"config.fusion.distill.{table}.{domain}"
            if domain not in d[table]:
                raise ConfigError(
                    f"{key} is missing: distillation needs a {table} for every seen domain "
                    f"(config_lib.set_distill_recipe fills the tables)"
                )
            value = d[table][domain]
            if table == "batch_size":
                if not isinstance(value, int) or value <= 0:
                    raise ConfigError(f"{key} must be a positive integer, got {value!r}")
                if value % num_devices:
                    raise ConfigError(
                        f"{key}={value} is not divisible by the {num_devices} devices of the "
                        f"mesh; use a multiple of {num_devices}"
                    )
            elif table == "anneal":
                _finite_positive(value, key.removeprefix("config."))
            elif not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}")
