"""The embedded default: the paper's whole protocol on the Glyphs benchmark, on a CPU.

Command (the README's first command; no arguments needed):

  ./run.sh                                   # = --config=configs/glyphs.py
  ./run.sh --config=configs/glyphs.py:tiny   # a 1-minute smoke run (what the e2e test runs)
  ./run.sh --config.per_domain.latin.rho=0.1  # any key can be overridden

Trains ERM and SAM backbones for the five seen scripts (CJK is the large "general"
domain, like ImageNet), fuses by fine-tuning the CJK backbone on the other seen scripts,
evaluates seen scripts with their own backbone and the seven unseen scripts with the
PARC-selected one, with NCC, PA (URL's pre-classifier alignment on cached embeddings,
all 600 episodes) and test-time fine-tuning, and writes work/report/.

PA costs ~5 min of the run on 2 quiet cores (estimate: 4 families x 12 domains x 600
episodes took 22 min on a machine running 4.4x below its quiet speed, README "Benchmarks
and expected cost"); ``--config.evaluation.pa_episodes=N`` runs it on the first N only.

TSA (task-specific adapters + PA, tsa.py) is not in the default; add it with

  ./run.sh --config.evaluation.adaptations="('ncc','pa','finetune','tsa')"

It runs on the first ``evaluation.tsa_episodes`` = 10 episodes of each domain for the
ERM and SAM families (``finetune_families``) with the reference recipe's 40 steps; a
step costs about one full fine-tuning step (README "Benchmarks and expected cost"), so
it adds about 1 hour on 2 quiet cores (27.6 s per Latin episode measured on a loaded
machine running bench/step.py's cpu18 at 4.4x below its quiet speed; padded supports of
160-500 images); ``--config.evaluation.tsa_steps`` / ``tsa_episodes`` trade it down.

Model and per-domain steps / lr / rho were chosen on the *validation* classes
(bench/tune_glyphs.py, README "Choosing the Glyphs recipe"), never on test classes.

Expected run time: ~12 min on 2 CPU cores (measured, README). Expected result: see the
README's Glyphs table (SAM vs ERM with paired 95% intervals).
"""

import ml_collections

from flatfsc_jax import config_lib

SEEN = ("cjk", "latin", "greek", "cyrillic", "kana")
UNSEEN = ("digits", "hangul", "thai", "arabic", "hebrew", "devanagari", "bengali")

# Per-domain recipe for 28x28 glyphs; rho is the best of {0.005, 0.01, 0.02, 0.05, 0.1}
# on each domain's validation classes (bench/tune_glyphs.py; README "Choosing the Glyphs
# recipe"). CJK needs a tiny rho: with larger ones SAM does not leave the initial
# ln(280) loss plateau within 400 steps.
GLYPHS_TABLE = {
    "cjk": dict(batch_size=64, lr=5e-2, num_steps=400, restart_period=400, rho=0.005),
    "latin": dict(batch_size=64, lr=5e-2, num_steps=200, restart_period=200, rho=0.05),
    "greek": dict(batch_size=64, lr=5e-2, num_steps=200, restart_period=200, rho=0.02),
    "cyrillic": dict(batch_size=64, lr=5e-2, num_steps=200, restart_period=200, rho=0.05),
    "kana": dict(batch_size=64, lr=5e-2, num_steps=200, restart_period=200, rho=0.05),
}


def get_config(arg=None):
    c = config_lib.base_config()
    c.benchmark = "glyphs"
    c.methods = ("erm", "sam")
    config_lib.with_table(c, GLYPHS_TABLE, SEEN)
    c.model = ml_collections.ConfigDict(
        dict(arch="resnet18", width=0.25, dtype="float32", lora_rank=0)
    )
    c.augment.pad = 3  # 8 px at 84 px, scaled to 28 px
    c.augment.saturation = c.augment.hue = 0.0  # grayscale glyphs
    c.validation.episodes = 100
    c.validation.every = 100
    c.checkpoint_every = 100
    c.log_every = 20
    c.fusion.enabled = True
    c.fusion.source_domain = "cjk"
    c.fusion.mode = "full"
    c.fusion.num_steps = 100
    c.fusion.restart_period = 100
    c.fusion.lr = 1e-2
    c.evaluation.domains = SEEN + UNSEEN
    c.evaluation.episodes = 600
    c.evaluation.adaptations = ("ncc", "pa", "finetune")
    c.evaluation.tsa_episodes = 10  # only with the TSA override (module docstring)
    # Test-time fine-tuning costs ~1 s per episode on 2 CPU cores (vs ~1 ms for NCC on
    # cached embeddings): the first 10 of the 600 episodes, 10 steps, ERM and SAM
    # backbones only, keep the whole job within 15 minutes.
    c.evaluation.finetune_episodes = 10
    c.evaluation.finetune_steps = 10
    c.evaluation.finetune_families = ("erm", "sam")
    # PARC compares all support pairs (O(S^2) plus a sort): 100 images per task suffice
    # to rank 5 backbones and keep 600 tasks x 5 backbones x 7 unseen scripts cheap.
    c.evaluation.parc_max_support = 100
    if arg == "tiny":  # smoke run: every stage, minimal work
        config_lib.with_table(
            c,
            {d: dict(GLYPHS_TABLE[d], num_steps=6, restart_period=6) for d in SEEN[:2]},
            SEEN[:2],
        )
        c.model.width = 0.125
        c.validation.episodes = c.validation.every = 3
        c.checkpoint_every = 3
        c.log_every = 3
        c.fusion.num_steps = c.fusion.restart_period = 3
        c.evaluation.domains = (SEEN[0], SEEN[1], UNSEEN[0])
        c.evaluation.episodes = 8
        c.evaluation.finetune_episodes = 2
        c.evaluation.finetune_steps = 2
    elif arg:
        raise ValueError(f"configs/glyphs.py takes no argument or 'tiny', got {arg!r}")
    return c
