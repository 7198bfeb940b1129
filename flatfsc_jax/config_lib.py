"""Building blocks of the experiment configs in ``configs/`` and their validation.

Configs are Python files whose ``get_config(arg)`` returns an ``ml_collections.ConfigDict``
(big_vision style); this module holds what they share: the default sub-configs, the
per-domain rows (``with_table``; the tables themselves are in ``configs/``), and
``validate``, which checks every key a run uses *before anything is compiled* and names
the key when it is wrong (library functions name only their own arguments).

An optional key is ``None`` when unset, never a sentinel 0:

* ``sam.m``: one perturbation from the whole batch;
* ``validation.every``, ``fusion.distill.validation_every``: every restart period;
* ``evaluation.finetune_lr``: evaluation/adapt.py's default for the mode;
* ``evaluation.pa_episodes``: all episodes;
* ``evaluation.parc_max_support``: the whole support set;
* ``model.head_classes``: no padding.

They are typed placeholders, so ``--config.sam.m=4`` still parses as an int.

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

import importlib.util
import os

import ml_collections
from ml_collections.config_dict import placeholder

from flatfsc_jax import errors
from flatfsc_jax.checks import check_int, check_number
from flatfsc_jax.data import meta_dataset_spec
from flatfsc_jax.data.episodes import EPISODE_SPECS as _EPISODE_SPECS

# Meta-Dataset's domains (the paper's per-domain recipe for the seen ones is
# configs/meta_dataset_table.py); names only, no TFDS import.
META_DATASET_SEEN = meta_dataset_spec.SEEN_SOURCES
META_DATASET_UNSEEN = meta_dataset_spec.UNSEEN_SOURCES

METHODS = ("erm", "sam")
FUSION_MODES = ("full", "lora", "distill")
# Zoo method name suffix of each fusion mode: sam + full -> sam+ft (families.py).
FUSION_SUFFIX = {"full": "ft", "lora": "lora", "distill": "kd"}
# Backbones imported from URL's released checkpoints (url_import.py), never trained
# here: its single-domain learners (one per seen domain) and its universal model.
IMPORTED_METHODS = ("url-sdl", "url")
BENCHMARKS = ("glyphs", "meta_dataset")
ADAPTATIONS = ("ncc", "pa", "finetune", "lora", "tsa")
# config.evaluation.episode_spec values (named test settings, data/episodes.py).
EPISODE_SPECS = tuple(_EPISODE_SPECS)

# Top-level key -> key of a per-domain row. The top-level keys are set only in the
# effective config of one zoo entry (``domain_config``), never in a run's config.
ROW_KEYS = {
    "batch_size": "batch_size",
    "lr": "lr",
    "num_steps": "num_steps",
    "restart_period": "restart_period",
    "sam.rho": "rho",
}


class ConfigError(errors.FlatfscError, ValueError):
    """A config key has a wrong value; the message names the key and the fix."""


def benchmark_domains(benchmark: str) -> tuple[str, ...]:
    """Every domain (seen and unseen) the data of ``benchmark`` has."""
    if benchmark == "glyphs":
        from flatfsc_jax.data import glyphs_spec  # constants only: cheap

        return glyphs_spec.DOMAINS
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

    # head_classes pads every domain's classification head to that many classes
    # (masked logits) so all domains share one compiled training step (training/step.py); None
    # gives each domain its own head width (and its own compilation).
    c.model = ml_collections.ConfigDict(
        dict(
            arch="resnet18",
            width=1.0,
            dtype="float32",
            lora_rank=0,
            head_classes=placeholder(int),
        )
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
    # m: m-sharpness chunk size; None = one perturbation from the whole batch.
    c.sam = ml_collections.ConfigDict(dict(adaptive=False, m=placeholder(int), eps=1e-12))
    c.sam.rho = placeholder(float)  # per_domain.<domain>.rho (0 for ERM entries)
    c.per_domain = ml_collections.ConfigDict()
    # The algorithm of the "sam" entries (docs/flat_methods.md); "erm" entries stay ERM.
    # rho, adaptive and eps are the sam keys above; MSAM's buffer uses momentum and
    # weight_decay; RWP's noise seed is config.seed.
    c.flat = ml_collections.ConfigDict(
        dict(
            method="sam",  # erm, sam, sam_late, sam_every_k, looksam, msam, rwp, gsam
            k=5,  # sam_every_k / looksam: a full SAM step every k steps
            looksam_alpha=0.7,
            noise_std=0.01,  # rwp: noise relative to each filter's norm
            clean_mix=0.5,  # rwp: weight of the clean gradient
            gsam_alpha=0.1,
            gsam_rho_min=placeholder(float),  # None: constant radius
            late_start=placeholder(int),  # sam_late's first SAM step; None: the final cycle
            clean_statistics=True,
            average="none",  # none, ema or swa (of the weights the entry stores)
            average_decay=0.999,
            average_start=0,
            average_period=1,
        )
    )

    # The input pipeline. None picks by backend (data_settings): on CPU the step is far
    # slower than one host thread, on an accelerator the host must not be the bottleneck.
    c.data = ml_collections.ConfigDict(
        dict(
            worker_count=placeholder(int),  # grain worker processes; 0 = this process
            prefetch=2,  # batches computed ahead
            device_augment=placeholder(bool),  # uint8 to the device, augmented there
            batched_read=True,  # one read per batch of a lazily read split
            # Meta-Dataset: "shipped" class splits, or the classes each source was
            # "prepared" with (a subset, e.g. the miniature of docs/meta-dataset.md).
            class_splits="shipped",
        )
    )

    # the paper augmentation; pad is 8 px at 84 px.
    c.augment = ml_collections.ConfigDict(
        dict(enabled=True, pad=8, contrast=0.2, saturation=0.2, hue=0.03, brightness=0.125)
    )

    # Validation during training: NCC (10 x cosine) on frozen embeddings.
    c.validation = ml_collections.ConfigDict(
        dict(every=placeholder(int), episodes=300, metric="cosine", batch_size=256)
    )  # every=None -> every restart period (the paper)
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
            # Fusion by distillation (URL; flatfsc_jax/fusion/distill.py). The per-domain tables
            # (batch_size, lambda_f, lambda_p, anneal) are filled by set_distill_recipe.
            distill=dict(
                num_steps=240_000,
                restart_period=48_000,
                lr=3e-2,
                adaptor_lr=0.1,
                adaptor_weight_decay=5e-4,
                temperature=4.0,
                validation_every=placeholder(int),  # None -> every restart period (URL)
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
            # Test episodes: "md" (Meta-Dataset's variable-way variable-shot) or URL's
            # "5shot" (varying-way 5-shot) and "1shot" (5-way 1-shot); data/episodes.py.
            episode_spec="md",
            metric="cosine",
            adaptations=("ncc",),
            finetune_episodes=600,  # episodes for the (slower) fine-tuning adaptations
            finetune_families=(),  # families fine-tuned at test time; () = all
            # Families evaluated; () = the run's (methods, then fused). May name the
            # imported "url-sdl" / "url" (docs/meta-dataset.md#cross-check-against-url).
            families=(),
            finetune_steps=40,
            finetune_lr=placeholder(float),  # None -> evaluation/adapt.py's default for the mode
            lora_rank=4,
            # PA (evaluation/pa.py) on cached embeddings; None -> all ``episodes``.
            pa_episodes=placeholder(int),
            pa_steps=40,
            # TSA (evaluation/tsa.py) runs the backbone at every step, like fine-tuning.
            tsa_episodes=600,
            tsa_steps=40,
            parc_support=True,  # unseen domains: pick the backbone per task with PARC
            # PARC on a random subset of this many support images; None -> all of them.
            parc_max_support=placeholder(int),
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
    return parse_fusion_modes(config.fusion.mode)


def run_families(config) -> list[str]:
    """The backbone families a run produces: its methods, then the fused ones mode by mode
    (``sam`` + ``full`` -> ``sam+ft``; families.py names them)."""
    modes = fusion_modes(config) if config.fusion.enabled else ()
    return list(config.methods) + [
        f"{m}+{FUSION_SUFFIX[mode]}" for mode in modes for m in config.methods
    ]


def evaluated_families(config) -> list[str]:
    """``config.evaluation.families`` when set, else every family the run produces."""
    return list(config.evaluation.get("families", ()) or ()) or run_families(config)


def parse_fusion_modes(value) -> tuple[str, ...]:
    """A ``fusion.mode`` value as a tuple of modes (also a stored entry's value)."""
    return tuple(m.strip() for m in str(value).split(",") if m.strip())


def parse_domain_arg(arg: str | None, table: dict, default: str) -> tuple[str, ...]:
    """``None``/``""`` -> default; ``"all"`` -> every domain; ``"a,b"`` -> those."""
    arg = arg or default
    if arg == "all":
        return tuple(table)
    return tuple(a for a in arg.split(",") if a)


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
        if "flat" in c:  # config.flat is the algorithm of "sam" entries only
            c.flat = base_config().flat
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


def sibling_module(config_file: str, name: str):
    """The module ``<name>.py`` next to ``config_file`` (a config's ``__file__``).

    ``config_flags`` loads a config by its path and ``configs/`` is not an installed
    package, so a config shares code with its siblings by path (it then works from any
    working directory, as the config itself does).
    """
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"flatfsc_configs.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _int(value, key, *, minimum=1, none=None):
    check_int(f"config.{key}", value, minimum=minimum, none=none, error=ConfigError)


def _number(value, key, **kwargs):
    check_number(f"config.{key}", value, error=ConfigError, **kwargs)


def _finite_positive(value, key):
    _number(value, key, positive=True)


def data_settings(config) -> dict:
    """``config.data`` with its None defaults resolved for this backend (the pipeline's
    keyword arguments). CPU: no worker processes, host augmentation (the reference).
    Accelerators: up to 8 workers (half the host's cores) and augmentation on the device."""
    import jax

    accelerator = jax.default_backend() != "cpu"
    d = config.data
    workers = d.worker_count
    if workers is None:
        workers = min(8, max(1, (os.cpu_count() or 2) // 2)) if accelerator else 0
    device_augment = d.device_augment
    if device_augment is None:
        device_augment = accelerator
    return dict(
        worker_count=int(workers),
        prefetch=int(d.prefetch),
        device_augment=bool(device_augment),
        batched_read=bool(d.batched_read),
    )


def flat_settings(cfg: ml_collections.ConfigDict):
    """The ``FlatMethod`` of one entry's effective config (``domain_config``), or ``None``
    for an ERM entry (rho 0: plain ERM whatever ``config.flat`` says).

    ``ConfigError`` names the ``config.flat.*`` key at fault.
    """
    from flatfsc_jax import flat_methods, flat_optimizers

    if not cfg.sam.rho:
        return None
    values = dict(cfg.flat.to_dict())
    known = set(base_config().flat)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"config.flat.{unknown[0]} is not a flat-method key; the keys are {sorted(known)} "
            "(rho, adaptive and eps are config.per_domain.<domain>.rho and config.sam.*)"
        )
    late_start = values.pop("late_start")
    if late_start is None:
        late_start = flat_optimizers.final_cycle_start(cfg.num_steps, cfg.restart_period)
    values.update(
        start_step=late_start,
        rho=cfg.sam.rho,
        adaptive=cfg.sam.adaptive,
        eps=cfg.sam.eps,
        m=cfg.sam.m,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
    )
    return flat_methods.FlatMethod.from_config(values, prefix="config.flat.", error=ConfigError)


def validate(
    config: ml_collections.ConfigDict, num_processes: int = 1, *, evaluation: bool = True
) -> None:
    """Raises ``ConfigError`` naming the first bad key; cheap, run before compiling.

    Checks every key a run reads: benchmark, domains and their table rows, methods,
    model, optimiser, SAM, validation, checkpoint/log intervals, fusion and evaluation
    settings. The library functions these keys reach check their own arguments again
    only where they must (shapes known at call time), naming the argument.
    ``evaluation=False``: the training stages' own re-check (they read no evaluation key;
    the run and ``--dry_run`` checked them already).
    """
    from flatfsc_jax import models

    if config.benchmark not in BENCHMARKS:
        raise ConfigError(f"config.benchmark={config.benchmark!r} is unknown; choose {BENCHMARKS}")
    class_splits = config.data.class_splits
    if class_splits not in ("shipped", "prepared"):
        raise ConfigError(
            f"config.data.class_splits={class_splits!r} is unknown; choose 'shipped' (MD's class "
            "splits) or 'prepared' (the classes each prepared Meta-Dataset source holds)"
        )
    if class_splits == "prepared" and config.benchmark != "meta_dataset":
        raise ConfigError(
            "config.data.class_splits='prepared' applies to benchmark='meta_dataset' only"
        )
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
    if "data" in config:
        _int(config.data.worker_count, "data.worker_count", minimum=0, none="by backend")
        _int(config.data.prefetch, "data.prefetch", minimum=0)
        for key in ("device_augment", "batched_read"):
            value = config.data[key]
            if not (isinstance(value, bool) or (value is None and key == "device_augment")):
                raise ConfigError(f"config.data.{key}={value!r} must be True or False")
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
    _int(config.model.get("lora_rank", 0), "model.lora_rank", minimum=0)
    _int(config.model.get("head_classes"), "model.head_classes", none="no padding")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(
            f"config.model.dtype must be float32 or bfloat16, got {config.model.dtype!r}"
        )
    _number(config.momentum, "momentum", below=1.0)
    _number(config.weight_decay, "weight_decay")
    _number(config.label_smoothing, "label_smoothing", below=1.0)
    _int(config.sam.m, "sam.m", none="one perturbation from the whole batch")
    _finite_positive(config.sam.eps, "sam.eps")
    check_row_overrides(config)
    for d in config.domains:
        prefix, row = f"per_domain.{d}.", config.per_domain[d]
        _number(row.rho, prefix + "rho", hint=" (0 disables SAM)")
        _finite_positive(row.lr, prefix + "lr")
        for key in ("batch_size", "num_steps", "restart_period"):
            _int(row[key], prefix + key)
        # Only processes must divide a batch: each process's mesh takes as many of its
        # devices as divide its slice (training/step.py make_mesh).
        if row.batch_size % num_processes:
            raise ConfigError(
                f"config.{prefix}batch_size={row.batch_size} is not divisible by the "
                f"{num_processes} processes; use a multiple of {num_processes}"
            )
        m = config.sam.m
        if m is not None and row.batch_size % m:
            raise ConfigError(
                f"config.{prefix}batch_size={row.batch_size} is not divisible by "
                f"config.sam.m={m} (m-sharpness chunks); choose m among its divisors or "
                f"leave config.sam.m unset (None)"
            )
    _int(config.checkpoint_every, "checkpoint_every")
    _int(config.log_every, "log_every")
    _int(config.validation.episodes, "validation.episodes")
    _int(config.validation.batch_size, "validation.batch_size")
    _int(config.validation.every, "validation.every", none="every restart period")
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
        _int(f.num_steps, "fusion.num_steps")
        _int(f.restart_period, "fusion.restart_period")
        if "lora" in modes:
            _int(f.lora_rank, "fusion.lora_rank")
    if evaluation:
        _validate_evaluation(config, known)
    _validate_flat(config)
    # A per-entry config (domain_config: one domain) trains one backbone, never a student.
    if config.fusion.enabled and "distill" in modes and len(config.domains) > 1:
        validate_distill(config, num_processes)


def _validate_evaluation(config, known) -> None:
    ev = config.evaluation
    _int(ev.get("pa_episodes"), "evaluation.pa_episodes", none="all episodes")
    for key in ("pa_steps", "tsa_episodes", "tsa_steps"):
        _int(ev.get(key, 0), f"evaluation.{key}", minimum=0)
    produced = run_families(config)
    wanted = tuple(ev.get("families", ()) or ())
    for fam in wanted:
        if fam not in produced and fam not in IMPORTED_METHODS:
            raise ConfigError(
                f"config.evaluation.families has {fam!r}: evaluate this run's families "
                f"{produced} or the imported {list(IMPORTED_METHODS)}"
            )
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"config.evaluation.families={wanted} names a family twice")
    if ev.get("episode_spec", "md") not in EPISODE_SPECS:
        raise ConfigError(
            f"config.evaluation.episode_spec must be one of {EPISODE_SPECS}, got "
            f"{ev.episode_spec!r}"
        )
    if ev.enabled:
        if not ev.domains:
            raise ConfigError(
                "config.evaluation.domains is empty; name the domains to evaluate (or set "
                "--config.evaluation.enabled=False)"
            )
        for d in ev.domains:
            if d not in known:
                raise ConfigError(
                    f"config.evaluation.domains has {d!r}, not a {config.benchmark} domain; "
                    f"choose from {known}"
                )
        _int(ev.episodes, "evaluation.episodes")
        if ev.metric not in ("cosine", "euclidean"):
            raise ConfigError(
                f"config.evaluation.metric must be cosine or euclidean, got {ev.metric!r}"
            )
        if not ev.adaptations:
            raise ConfigError(
                f"config.evaluation.adaptations is empty; choose from {ADAPTATIONS} (or set "
                "--config.evaluation.enabled=False)"
            )
        for a in ev.adaptations:
            if a not in ADAPTATIONS:
                raise ConfigError(
                    f"config.evaluation.adaptations has {a!r}; choose from {ADAPTATIONS}"
                )
        # A repeated adaptation would count each domain twice (a CI too narrow by sqrt 2).
        repeated = sorted({a for a in ev.adaptations if list(ev.adaptations).count(a) > 1})
        if repeated:
            raise ConfigError(
                f"config.evaluation.adaptations={tuple(ev.adaptations)} repeats {repeated}; "
                "name each adaptation once"
            )
        # An adaptation with no episodes or no steps would report an empty or NCC table.
        needs = {
            "pa": ("pa_steps",),
            "tsa": ("tsa_episodes", "tsa_steps"),
            "finetune": ("finetune_episodes",),
            "lora": ("finetune_episodes",),
        }
        for a in ev.adaptations:
            for key in needs.get(a, ()):
                if ev[key] == 0:
                    raise ConfigError(
                        f"config.evaluation.{key}=0 but config.evaluation.adaptations has "
                        f"{a!r}; give it at least 1 or drop {a!r} from the adaptations"
                    )
        # Read only by the adaptations that run the backbone per task (protocol.py).
        if ev.finetune_families and set(ev.adaptations) & {"finetune", "lora", "tsa"}:
            produced = evaluated_families(config)
            unknown = [f for f in ev.finetune_families if f not in produced]
            if unknown:
                kept = tuple(f for f in ev.finetune_families if f in produced)
                raise ConfigError(
                    f"config.evaluation.finetune_families has {unknown}, not a family this "
                    f"run produces ({produced}); drop it, e.g. "
                    f'--config.evaluation.finetune_families="{kept}"'
                )
        if any(a != "ncc" for a in ev.adaptations):
            _int(ev.finetune_steps, "evaluation.finetune_steps")
            _int(ev.finetune_episodes, "evaluation.finetune_episodes", minimum=0)
            if "lora" in ev.adaptations:
                _int(ev.lora_rank, "evaluation.lora_rank")
            _number(ev.finetune_lr, "evaluation.finetune_lr", positive=True, none="the default")
        _int(ev.parc_max_support, "evaluation.parc_max_support", none="all support images")


def validate_distill(config, num_processes: int = 1) -> None:
    """Checks ``config.fusion.distill`` for ``config.domains``; ``ConfigError`` names the key."""
    d = config.fusion.distill
    src = config.fusion.source_domain
    if src not in config.domains:
        raise ConfigError(
            f"config.fusion.source_domain={src!r} is not one of config.domains "
            f"{tuple(config.domains)}; distillation needs the general domain's teacher"
        )
    for key in ("num_steps", "restart_period"):
        _int(d[key], f"fusion.distill.{key}")
    for key in ("lr", "adaptor_lr", "temperature"):
        _finite_positive(d[key], f"fusion.distill.{key}")
    _number(d.adaptor_weight_decay, "fusion.distill.adaptor_weight_decay")
    _int(d.validation_every, "fusion.distill.validation_every", none="every restart period")
    for table in ("batch_size", "lambda_f", "lambda_p", "anneal"):
        for domain in config.domains:
            key = f"fusion.distill.{table}.{domain}"
            if domain not in d[table]:
                raise ConfigError(
                    f"config.{key} is missing: distillation needs a {table} for every seen "
                    f"domain (config_lib.set_distill_recipe fills the tables)"
                )
            value = d[table][domain]
            if table == "batch_size":
                _int(value, key)
                if value % num_processes:
                    raise ConfigError(
                        f"config.{key}={value} is not divisible by the {num_processes} "
                        f"processes; use a multiple of {num_processes}"
                    )
            elif table == "anneal":
                _finite_positive(value, key)
            else:
                _number(value, key)


def _validate_flat(config) -> None:
    """Checks ``config.flat`` with every seen domain's row (``ConfigError`` names the key)."""
    if "flat" not in config:
        return
    if config.flat.late_start is not None:
        _int(config.flat.late_start, "flat.late_start", minimum=0)
    for d in config.domains:
        row = config.per_domain[d]
        entry = ml_collections.ConfigDict(config.to_dict())
        entry.num_steps, entry.restart_period = row.num_steps, row.restart_period
        entry.sam.rho = row.rho or 1.0  # the flat settings of a "sam" entry of this row
        flat_settings(entry)
