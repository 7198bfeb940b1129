"""The backbone families: ``erm``, ``sam`` and the fused ``+ft``, ``+lora``, ``+kd``.

A family is a training method, optionally followed by a fusion mode. Every stage names
families the same way, so the vocabulary lives here once: the fusion stage names the
entries it writes (:func:`fused_method`), the protocol decides which zoo entry serves a
family on a domain (:func:`family_backbone`), and the report orders the columns and picks
the paired differences (:data:`FAMILY_ORDER`, :func:`comparisons`).
"""

from __future__ import annotations

from collections.abc import Sequence

from flatfsc_jax import config_lib

# Fusion mode (config.fusion.mode) -> the suffix of the family it produces.
FUSION_SUFFIX = config_lib.FUSION_SUFFIX
# URL's universal model serves every domain; its zoo entry is <benchmark>/universal/url.
URL_DOMAIN = "universal"

# The paper's column order; families not listed keep their order after these.
FAMILY_ORDER = ("erm", "sam", "erm+kd", "sam+kd", "erm+ft", "sam+ft", "erm+lora", "sam+lora")


def fused_method(method: str, mode: str) -> str:
    """Zoo method name of a fused backbone: ``sam`` + ``full`` -> ``sam+ft`` (or +lora, +kd)."""
    if mode not in FUSION_SUFFIX:
        raise ValueError(f"fusion mode {mode!r} is unknown; choose one of {tuple(FUSION_SUFFIX)}")
    return f"{method}+{FUSION_SUFFIX[mode]}"


def fused_families(config) -> list[str]:
    """The fused backbone families ``config`` produces, mode by mode (``erm+ft``, ...)."""
    return [
        fused_method(m, mode) for mode in config_lib.fusion_modes(config) for m in config.methods
    ]


def families(config) -> list[str]:
    """Backbone families a run evaluates: ``config.evaluation.families`` when set, else
    the methods, then the fused families."""
    return config_lib.evaluated_families(config)


def family_backbone(config, family: str, domain: str) -> tuple[str, str]:
    """(domain, method) of the zoo entry a family uses for a seen domain.

    A distilled (``+kd``) family has one student for all domains, stored under the
    general domain's name.
    """
    if family == "url":  # imported: one universal backbone for every domain
        return URL_DOMAIN, family
    if family.endswith("+kd"):
        return config.fusion.source_domain, family
    if "+" in family and domain == config.fusion.source_domain:
        return domain, family.split("+")[0]
    return domain, family


def ordered_families(families_: Sequence[str]) -> list[str]:
    """``families_`` in the paper's order; unknown names keep their order, at the end."""
    known = [f for f in FAMILY_ORDER if f in families_]
    return known + [f for f in families_ if f not in FAMILY_ORDER]


def sam_vs_erm(methods: Sequence[str]) -> list[tuple[str, str]]:
    """(SAM variant, its ERM counterpart) pairs present in ``methods``, in its order.

    ``sam`` pairs with ``erm``, ``sam+X`` with ``erm+X``.
    """
    return [(m, "erm" + m[3:]) for m in methods if m.startswith("sam") and "erm" + m[3:] in methods]


def comparisons(families_: Sequence[str]) -> list[tuple[str, str]]:
    """(a, b) pairs reported as the paired difference a - b, where both families exist.

    SAM - ERM for plain, +KD, +FT and +LoRA backbones; then FT - KD and LoRA - KD within
    ERM and within SAM (the paper's claim that fusion by fine-tuning matches distillation).
    """
    candidates = sam_vs_erm(FAMILY_ORDER)
    candidates += [(f"{m}+{fuse}", f"{m}+kd") for fuse in ("ft", "lora") for m in ("erm", "sam")]
    return [(a, b) for a, b in candidates if a in families_ and b in families_]
