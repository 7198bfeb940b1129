"""What defines a zoo entry: the config keys compared before an entry is reused.

A complete entry is reused only when the keys that define its backbone are unchanged
(``experiment.check_reuse``), and an unfinished run resumes only under the same keys
(``Zoo.begin``). Plain backbones, fused (``+ft``/``+lora``) entries and distilled
students (``+kd``) each have their own set.
"""

from __future__ import annotations

from flatfsc_jax import config_lib

# Effective-config keys (``config_lib.domain_config``) that define a backbone: a complete
# entry is reused only when all of them are unchanged. Evaluation, logging, checkpoint
# intervals and paths do not change the stored backbone and are not compared. Validation
# settings are: they choose which step's weights become ``best/``.
BACKBONE_KEYS = (
    "benchmark",
    "domains",
    "methods",
    "seed",
    "model.arch",
    "model.width",
    "model.dtype",
    "batch_size",
    "lr",
    "num_steps",
    "restart_period",
    "momentum",
    "weight_decay",
    "label_smoothing",
    "sam.rho",
    "sam.adaptive",
    "sam.m",
    "sam.eps",
    "flat.",  # the flat method of "sam" entries (ERM entries store the defaults)
    "augment.",  # every augmentation key
    "validation.every",
    "validation.episodes",
    "validation.metric",
    "data.class_splits",  # which classes of a prepared source are trained on
)
# Also compared for fused entries (``<domain>/<method>+ft`` / ``+lora``).
FUSED_KEYS = ("fusion.source_domain", "fusion.mode", "fusion.lora_rank")
# What defines a distilled student (``<source>/<method>+kd``): its own recipe, the seen
# domains, and every teacher's row (a teacher's rho or lr changes the teacher). The
# student's config (``distill.student_config``) holds exactly these keys. The teachers'
# checksums are compared besides (``Zoo.begin``, ``experiment.check_fused_sources``).
STUDENT_KEYS = (
    "benchmark",
    "domains",
    "seed",
    "model.arch",
    "model.width",
    "model.dtype",
    "momentum",
    "weight_decay",
    "sam.adaptive",
    "sam.eps",
    "augment.",
    "validation.episodes",
    "validation.metric",
    "fusion.source_domain",
    "fusion.distill.",
    "per_domain.",
)
# Keys whose "unset" was stored as 0 before configs used None (config_lib): an entry
# written then with 0 was trained exactly as one with None is, so it is not stale.
LEGACY_UNSET = {"sam.m": 0, "validation.every": 0}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def entry_kind(method: str) -> str:
    """``backbone`` (erm, sam), ``student`` (``+kd``), ``fused`` (``+ft``, ``+lora``) or
    ``imported`` (``url-sdl``, ``url``: written by cli/import_url.py, never trained)."""
    if method in config_lib.IMPORTED_METHODS:
        return "imported"
    if method.endswith("+kd"):
        return "student"
    return "fused" if "+" in method else "backbone"


def config_changes(stored: dict, wanted: dict, *, fused: bool = False, student=False) -> list[str]:
    """``"key: old -> new"`` for every backbone-defining key that differs.

    The keys are ``BACKBONE_KEYS`` (plus ``FUSED_KEYS`` for a fused entry), or
    ``STUDENT_KEYS`` for a distilled student.

    A key missing from ``stored`` (an entry written before the key existed) is not
    compared: the entry was trained without it. A stored legacy 0 of ``LEGACY_UNSET``
    compares as None.
    """
    old, new = _flatten(stored), _flatten(wanted)
    for k, unset in LEGACY_UNSET.items():
        if k in old and old[k] == unset:
            old[k] = None
    # A fused entry depends on its own mode only; entries written before fused configs
    # stored that one mode hold the run's whole list (e.g. "full,distill" for a +ft entry).
    mode = new.get("fusion.mode")
    if fused and mode and mode in config_lib.parse_fusion_modes(old.get("fusion.mode", "")):
        old["fusion.mode"] = mode
    patterns = STUDENT_KEYS if student else BACKBONE_KEYS + (FUSED_KEYS if fused else ())
    keys = sorted(
        k
        for k in set(old) | set(new)
        if any(k == p or (p.endswith(".") and k.startswith(p)) for p in patterns)
    )
    # A student's stored config may hold rows of domains it never saw (written whole).
    keys = [k for k in keys if k in old and (k in new or not student)]
    return [f"{k}: {old[k]!r} -> {new.get(k)!r}" for k in keys if old[k] != new.get(k)]
