"""Does flatness predict transfer? A designed population of backbones on one Glyphs script.

Command (one line, resumable: re-run it after an interruption and finished work is kept):

  python -m flatfsc_jax.cli.flatness_study --config=configs/flatness_study.py --workdir=study
  python -m flatfsc_jax.cli.flatness_study --config=configs/flatness_study.py:tiny ...  # test
  ... --stages=train          # train the population only (in pieces: interrupt and re-run)

Population: 60 backbones (ResNet-18, width 0.25) trained on Latin for a fixed 500 steps:
optimiser {ERM, SAM, ASAM, Momentum-SAM, SAM-late} x learning rate {0.02, 0.05} x batch
size {32, 64} x rho (two levels each for SAM and ASAM, one for the cheaper two) = 28
configurations x 2 seeds, plus 2 more seeds for the ERM and SAM anchors (the Glyphs
recipe's Latin row: lr 0.05, batch 64, SAM rho 0.1), which give the seed-noise floor.
Stopping rule: the training loop's own, the checkpoint with the best validation NCC
accuracy (100 episodes on Latin's held-out classes, at the end of each of the two 250-step
cosine cycles).

Cost: the measured run time and its machine's bench/step.py figure are in
docs/flatness-transfer.md#results. ``:tiny`` (9 conv4 backbones, 4 steps, tiny measurement
settings) is what tests/system/test_flatness_study.py runs.

What it can detect: with n = 60 backbones, |tau| >= 0.17 at two-sided p < .05
(``significance.min_detectable_tau(60)``); smaller correlations are "not detectable at this
size", not absent. The primary test (one measure, one outcome, named below before the
run) is read unadjusted; everything else is exploratory with Holm over measures x outcomes.
Study design and statistics: docs/flatness-transfer.md#design.
"""

import ml_collections

from flatfsc_jax import config_lib

SOURCE = "latin"
# Near: scripts that share letter shapes with Latin; far: unrelated scripts.
NEAR_TARGETS = ("greek", "cyrillic")
FAR_TARGETS = ("hangul", "devanagari")

# The optimiser factor. Each optimiser is a training method (config.methods) with config
# overrides (nested, merged into the member's config) and its own rho levels. The cheaper
# routes to flat minima (config.flat.*, docs/flat_methods.md) join at SAM's anchor radius:
# Momentum-SAM (~1x ERM's cost) and SAM in the final cycle only (the last 250 steps).
OPTIMISERS = {
    "erm": dict(method="erm", overrides={}, rho=(0.0,)),
    "sam": dict(method="sam", overrides={"sam": {"adaptive": False}}, rho=(0.02, 0.1)),
    # ASAM's radius is relative to |w| and so an order of magnitude larger than SAM's.
    "asam": dict(method="sam", overrides={"sam": {"adaptive": True}}, rho=(0.1, 0.5)),
    "msam": dict(method="sam", overrides={"flat": {"method": "msam"}}, rho=(0.1,)),
    "sam_late": dict(method="sam", overrides={"flat": {"method": "sam_late"}}, rho=(0.1,)),
}


def study_settings():
    return ml_collections.ConfigDict(
        dict(
            source=SOURCE,
            near_targets=NEAR_TARGETS,
            far_targets=FAR_TARGETS,
            optimisers=OPTIMISERS,
            lrs=(0.02, 0.05),
            batch_sizes=(32, 64),
            seeds=2,
            # The anchors: (optimiser, lr, batch size, rho) given anchor_seeds seeds in all.
            anchors=(("erm", 0.05, 64, 0.0), ("sam", 0.05, 64, 0.1)),
            anchor_seeds=4,
            num_steps=500,
            restart_period=250,
            # Named before the run; every other (measure, outcome) row is exploratory.
            primary_measure="adaptive_worst_sharpness",
            primary_outcome="unseen_mean",
            # Measurement on a fixed, seeded subset of source training images (BN eval).
            examples=512,
            heldout_examples=512,
            sharpness=dict(
                average_samples=20,
                worst_steps=20,
                worst_batch=128,
                trace_samples=10,
                power_iters=20,
                relative_flatness_samples=100,
                seed=0,
            ),
            # Outcomes: NCC on the same seeded test episodes for every backbone.
            episodes=600,
            episode_seed=1000,
            parc_max_support=100,
            # Statistics (reporting/correlation.py).
            n_boot=2000,
            n_perm=10_000,  # Holm over the ~64 tests can then reach p < .05 (floor 0.013)
            stats_seed=0,
        )
    )


def get_config(arg=None):
    glyphs = config_lib.sibling_module(__file__, "glyphs")
    c = glyphs.get_config()
    args = [a for a in (arg or "").split(",") if a]
    if any(a != "tiny" for a in args):
        raise ValueError(f"configs/flatness_study.py takes no argument or 'tiny', got {arg!r}")
    c.study = study_settings()
    row = dict(glyphs.GLYPHS_TABLE[SOURCE])
    row.update(num_steps=c.study.num_steps, restart_period=c.study.restart_period)
    config_lib.with_table(c, {SOURCE: row}, (SOURCE,))
    c.methods = ("erm",)  # each member sets its own (flatness/study.py)
    # One source domain: the head is its own classes (the sharpness measures need it so).
    c.model.head_classes = None
    c.fusion.enabled = False
    c.evaluation.enabled = False  # the study evaluates (flatness/study.py)
    if "tiny" in args:
        s = c.study
        c.model.arch, c.model.width = "conv4", 0.25
        # One cheaper method (a config.flat override) besides the three SAM/ERM kinds.
        s.optimisers = {
            k: dict(v, rho=v["rho"][-1:]) for k, v in OPTIMISERS.items() if k != "sam_late"
        }
        s.lrs, s.batch_sizes, s.seeds = (0.05,), (16,), 2
        s.anchors, s.anchor_seeds = (("erm", 0.05, 16, 0.0),), 3  # a noise band to draw
        s.num_steps = s.restart_period = 4
        config_lib.with_table(
            c, {SOURCE: dict(row, num_steps=4, restart_period=4, batch_size=16)}, (SOURCE,)
        )
        c.validation.episodes = c.validation.every = 4
        c.checkpoint_every = c.log_every = 4
        s.near_targets, s.far_targets = ("greek",), ("hangul", "digits")
        s.examples = s.heldout_examples = 64
        s.sharpness = dict(
            average_samples=2,
            worst_steps=2,
            worst_batch=32,
            trace_samples=2,
            power_iters=2,
            relative_flatness_samples=2,
            seed=0,
        )
        s.episodes, s.parc_max_support = 20, 30
        s.n_boot = s.n_perm = 200
    return c
