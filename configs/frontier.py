"""Which route to a flat minimum is worth its price? Cost, flatness and transfer of every
flat method on Glyphs.

Command (resumable: re-run it after an interruption and finished work is kept):

  python -m flatfsc_jax.cli.frontier --config=configs/frontier.py --workdir=frontier
  python -m flatfsc_jax.cli.frontier --config=configs/frontier.py:tiny ...  # the test's
  python -m flatfsc_jax.cli.frontier --config=configs/frontier.py:long ...  # 5x the steps

Population: 10 methods x 3 seeds = 30 ResNet-18 (width 0.25) backbones trained on Latin
at its default budget (configs/glyphs.py: 500 steps, two 250-step cosine cycles, batch 64,
lr 0.05, rho 0.1), the best-validation checkpoint kept as in every run. Latin alone keeps
the run within about 45 minutes on 2 CPU cores; one source means PARC has nothing to
select (docs/frontier.md). ERM at SAM's compute (``erm_2x``) runs 1000 steps, the same
two cycles stretched. Every method uses SAM's radius and the method's paper defaults: no
method was tuned, which favours none of them.

Outcome: NCC accuracy on all 7 unseen scripts, 600 shared seeded episodes each.
Cost, result and reading: docs/frontier.md, next to this command.
"""

import ml_collections

from flatfsc_jax import config_lib

SOURCE = "latin"
UNSEEN = ("digits", "hangul", "thai", "arabic", "hebrew", "devanagari", "bengali")
LATE_FRACTION = 0.15  # SAM-late's share of the steps (Zhou et al.: the last 10-15%)

# Each method: the zoo entry's method, config.flat overrides (docs/flat_methods.md) and a
# budget (a multiple of the row's steps). The SAM-family radius is the row's rho.
METHODS = {
    "erm": dict(method="erm"),
    # Weight averaging alone: a "sam" entry whose gradient is ERM's. Decay 0.99 averages
    # over ~100 steps, a fifth of the run (0.999 would weigh the initialisation).
    "ema": dict(method="sam", flat=dict(method="erm", average="ema", average_decay=0.99)),
    "msam": dict(method="sam", flat=dict(method="msam")),
    "sam_late": dict(method="sam", flat=dict(method="sam_late")),  # late_start: get_config
    "sam_every_k": dict(method="sam", flat=dict(method="sam_every_k", k=5)),
    "looksam": dict(method="sam", flat=dict(method="looksam", k=5)),
    "rwp": dict(method="sam", flat=dict(method="rwp")),  # m-RWP: clean_mix 0.5, 2 gradients
    "gsam": dict(method="sam", flat=dict(method="gsam")),
    "sam": dict(method="sam"),
    "erm_2x": dict(method="erm", budget=2),  # the same gradient evaluations as SAM
}


def get_config(arg=None):
    glyphs = config_lib.sibling_module(__file__, "glyphs")
    c = glyphs.get_config()
    args = [a for a in (arg or "").split(",") if a]
    if any(a not in ("tiny", "long") for a in args) or len(args) > 1:
        raise ValueError(f"configs/frontier.py takes no argument, 'tiny' or 'long', got {arg!r}")
    row = dict(glyphs.GLYPHS_TABLE[SOURCE])
    if "long" in args:  # configs/glyphs.py's ':long' budget: 5x the steps, for an accelerator
        row["num_steps"] *= 5
    config_lib.with_table(c, {SOURCE: row}, (SOURCE,))
    c.methods = ("erm",)  # each member sets its own (flatness/frontier.py)
    c.model.head_classes = None  # one source: the head is its own classes
    c.fusion.enabled = False
    c.evaluation.enabled = False  # the frontier evaluates (flatness/frontier.py)
    c.frontier = ml_collections.ConfigDict(
        dict(
            methods={k: dict(v) for k, v in METHODS.items()},
            seeds=3,
            targets=UNSEEN,
            goal_cost=1.25,  # the goal: <= 1.25x ERM's gradients, as flat as SAM, as good
        )
    )
    # The measurement and evaluation settings of the flatness study's driver (reused).
    study = config_lib.sibling_module(__file__, "flatness_study").study_settings()
    c.study = ml_collections.ConfigDict(
        dict(
            source=SOURCE,
            examples=256,
            heldout_examples=256,
            # Only the trace, the top eigenvalue and the SAM gap enter the table: the
            # adaptive measures run at their minimum.
            sharpness=dict(
                study.sharpness.to_dict(),
                average_samples=2,
                worst_steps=1,
                relative_flatness_samples=2,
            ),
            episodes=600,
            episode_seed=study.episode_seed,
            parc_max_support=study.parc_max_support,
        )
    )
    if "tiny" in args:
        c.model.arch, c.model.width = "conv4", 0.25
        config_lib.with_table(
            c, {SOURCE: dict(row, num_steps=4, restart_period=4, batch_size=16)}, (SOURCE,)
        )
        c.validation.episodes = c.validation.every = 4
        c.checkpoint_every = c.log_every = 4
        c.frontier.seeds = 2
        c.frontier.targets = ("greek", "digits")
        c.frontier.methods = {k: dict(METHODS[k]) for k in ("erm", "sam_late", "sam", "erm_2x")}
        c.study.examples = c.study.heldout_examples = 64
        c.study.sharpness = dict(
            c.study.sharpness.to_dict(), trace_samples=2, power_iters=2, worst_batch=32
        )
        c.study.episodes, c.study.parc_max_support = 20, 30
    steps = c.per_domain[SOURCE].num_steps
    late = c.frontier.methods.get("sam_late")
    if late is not None:
        late.flat.late_start = steps - max(1, round(LATE_FRACTION * steps))
    return c
