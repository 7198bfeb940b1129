"""Information fusion by fine-tuning (the paper's "+FT" backbones).

The baseline (URL) distils all domain backbones into one network; the paper instead
takes the backbone trained on the large, general domain (ImageNet; CJK ideographs on
Glyphs) and fine-tunes it on each other seen domain, with SAM for the SAM variant. Each
result is its own zoo entry ``<domain>/<method>+ft`` (full fine-tuning) or
``<domain>/<method>+lora`` (only low-rank adapters and a new head are trained; the
adapters are merged into the stored kernels). For the general domain itself the fused
backbone *is* its own backbone, so no entry is written for it.

Hyper-parameters (``config.fusion``; the paper did not publish them): the target
domain's batch size and rho, SGD with momentum and coupled weight decay as in backbone
training, a learning rate 10x below the from-scratch rate (the trunk is already good;
a large rate would erase what the general domain taught), and one cosine cycle of
``config.fusion.num_steps`` steps. LoRA trains far fewer weights and so uses a higher
rate. Validation and best-checkpoint selection are as in backbone training.

``config.fusion.mode`` may name several modes, comma-separated: ``"full,distill"`` fuses
by fine-tuning *and* trains the distillation students (``flatfsc_jax/fusion/distill.py``: one
``<source_domain>/<method>+kd`` entry per method, from the per-domain teachers).
"""

from __future__ import annotations

import functools
import logging

import ml_collections

from flatfsc_jax import config_lib, families
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.fusion import distill
from flatfsc_jax.training import loop

log = logging.getLogger(__name__)


def fusion_config(config: ml_collections.ConfigDict, mode: str | None = None):
    """``config`` with the fusion learning rate / steps / restart period in every row.

    With ``mode``, ``fusion.mode`` is that one mode: what a fused entry stores and is
    compared on (``zoo.FUSED_KEYS``), so the ``+ft`` entries of ``"full"`` and of
    ``"full,distill"`` are the same backbones and a zoo fused with one is reused by the
    other.
    """
    c = ml_collections.ConfigDict(config.to_dict())
    f = config.fusion
    if mode is not None:
        c.fusion.mode = mode
    for d in c.per_domain:
        row = c.per_domain[d]
        row.lr, row.num_steps, row.restart_period = f.lr, f.num_steps, f.restart_period
    return c


def fusion_targets(config) -> tuple[str, ...]:
    return tuple(d for d in config.domains if d != config.fusion.source_domain)


def fuse(
    config, zoo: zoo_lib.Zoo, method: str, *, progress=True, only=None
) -> list[zoo_lib.ZooEntry]:
    """Runs every mode of ``config.fusion.mode`` for ``method``; returns the entries.

    ``only(domain, entry_method)``: fuse just the entries it accepts (a process's share,
    ``experiment.shard_entries``); each entry is written under its ``Zoo.entry_lock``.

    A complete fine-tuned entry is reused only if it was fine-tuned from the current source
    backbone (same ``best/`` sha256, recorded in its metadata); otherwise it is retrained.
    """
    source = config.fusion.source_domain
    if source not in config.domains:  # config_lib.validate says so before any training
        raise config_lib.ConfigError(
            f"config.fusion.source_domain={source!r} is not one of config.domains "
            f"{tuple(config.domains)}"
        )
    entries = []
    for mode in config_lib.fusion_modes(config):
        if mode == "distill":
            name = families.fused_method(method, "distill")
            if only is None or only(source, name):
                with zoo.entry_lock(config.benchmark, source, name):
                    entries.append(_distill(config, zoo, method, progress=progress))
        else:
            entries += _fine_tune(config, zoo, method, mode, progress=progress, only=only)
    return entries


def _distill(config, zoo: zoo_lib.Zoo, method: str, *, progress) -> zoo_lib.ZooEntry:
    source, name = config.fusion.source_domain, families.fused_method(method, "distill")
    teachers_sha = distill.teacher_checksums(config, zoo, method)
    reused = zoo.reuse_or_begin(
        config.benchmark,
        source,
        name,
        {"config": distill.student_config(config), "teachers_sha256": teachers_sha},
        retrain=config.retrain,
        stage="fuse",
        outdated=functools.partial(distill.teachers_retrained, teachers_sha),
    )
    if reused is not None:
        return reused
    return distill.distill(config, zoo, method, progress=progress)


def _source_retrained(source_sha: str, source_key: str, entry: zoo_lib.ZooEntry) -> str | None:
    recorded = entry.metadata.get("fusion", {}).get("source_sha256")
    if recorded is None or recorded == source_sha:  # None: written before it was recorded
        return None
    return f"its source {source_key} was retrained"


def _fine_tune(
    config, zoo, method: str, mode: str, *, progress, only=None
) -> list[zoo_lib.ZooEntry]:
    """Fine-tunes the general domain's ``method`` backbone on every other seen domain."""
    source = config.fusion.source_domain
    target_method = families.fused_method(method, mode)
    domains = [d for d in fusion_targets(config) if only is None or only(d, target_method)]
    if not domains:
        return []
    start = zoo.load(config.benchmark, source, method)
    source_sha = start.entry.best_sha256
    cfg = fusion_config(config, mode)
    lora_rank = config.fusion.lora_rank if mode == "lora" else 0
    entries = []
    for domain in domains:
        with zoo.entry_lock(config.benchmark, domain, target_method):
            entry_cfg = config_lib.domain_config(cfg, domain, method)
            reused = zoo.reuse_or_begin(
                config.benchmark,
                domain,
                target_method,
                {"config": entry_cfg.to_dict(), "source_sha256": source_sha},
                retrain=config.retrain,
                stage="fuse",
                outdated=functools.partial(_source_retrained, source_sha, start.entry.key),
            )
            if reused is not None:
                entries.append(reused)
                continue
            entries.append(
                loop.train_and_evaluate(
                    cfg,
                    zoo,
                    domain,
                    method,
                    init_variables=start.variables,
                    lora_rank=lora_rank,
                    entry_method=target_method,
                    extra_metadata=dict(
                        fusion=dict(
                            source=f"{config.benchmark}/{source}/{method}",
                            source_sha256=source_sha,
                            mode=mode,
                            lora_rank=lora_rank,
                        )
                    ),
                    progress=progress,
                    stage="fuse",
                )
            )
    return entries
