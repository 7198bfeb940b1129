"""Meta-Dataset's source names and roles, importable without TFDS.

Config defaults and validation list the domains (``config_lib``); importing the
``meta_dataset`` package for that would load TFDS, so the names live here and
``meta_dataset.specs`` builds its registry on them (as ``glyphs_spec`` does for Glyphs).
"""

from __future__ import annotations

# The 8 seen sources (a backbone is trained on each one's train classes), then the 5
# unseen (test only), in Meta-Dataset's order.
SEEN_SOURCES = (
    "ilsvrc_2012",
    "omniglot",
    "aircraft",
    "cu_birds",
    "dtd",
    "quickdraw",
    "fungi",
    "vgg_flower",
)
UNSEEN_SOURCES = ("traffic_sign", "mscoco", "mnist", "cifar10", "cifar100")
ALL_SOURCES = SEEN_SOURCES + UNSEEN_SOURCES
