"""The embedded default: the paper's whole protocol on the Glyphs benchmark, on a CPU.

Command (no arguments needed):

  ./run.sh                                    # = --config=configs/glyphs.py
  ./run.sh --config=configs/glyphs.py:tiny    # a 1-minute smoke run (what the e2e test runs)
  ./run.sh --config=configs/glyphs.py:kd      # + distillation (erm+kd, sam+kd); "tiny,kd" too
  ./run.sh --config=configs/glyphs.py:long    # GPU/TPU: 5x training, fine-tuning, distillation
  ./run.sh --config.per_domain.latin.rho=0.1  # any key can be overridden (--dry_run to see)

Expected cost: 11 min 7 s from a fresh clone on 2 cores of an AMD EPYC machine where
``bench/step.py --models cpu18`` gives 2373 / 1190 img/s (ERM / SAM); its split:
docs/performance.md#where-the-time-goes. ":long" has not been run as a whole; its shorter
accelerator run: docs/performance.md#the-long-config-on-an-accelerator.

Expected result, SAM - ERM with NCC on the same 600 test episodes per domain, mean ± 95%
t-interval [range] over 3 training seeds: seen scripts -0.28 ± 0.48 [-0.48, -0.09],
unseen scripts -1.28 ± 3.51 [-2.26, +0.34] (docs/results.md#over-training-seeds).

The recipe (five seen scripts trained, CJK fused into the others, seven unseen scripts
evaluated through PARC), its choices and its departures from the paper: docs/design.md#glyphs.
"""

import ml_collections

from flatfsc_jax import config_lib

SEEN = ("cjk", "latin", "greek", "cyrillic", "kana")
UNSEEN = ("digits", "hangul", "thai", "arabic", "hebrew", "devanagari", "bengali")

# Per-domain recipe for 28x28 glyphs. Steps: where validation accuracy has plateaued for
# ERM and SAM (docs/results.md#convergence-and-the-budget); rho: the best of
# {0.01, 0.02, 0.05, 0.1} on each script's validation classes at this budget
# (docs/results.md#choosing-the-glyphs-recipe).
# Every seen script trains with its row, also when only some are trained; a zoo entry
# trained with another row stops the run (docs/zoo.md#reliability).
GLYPHS_TABLE = {
    "cjk": dict(batch_size=64, lr=5e-2, num_steps=2000, restart_period=500, rho=0.1),
    "latin": dict(batch_size=64, lr=5e-2, num_steps=500, restart_period=250, rho=0.1),
    "greek": dict(batch_size=64, lr=5e-2, num_steps=500, restart_period=250, rho=0.1),
    "cyrillic": dict(batch_size=64, lr=5e-2, num_steps=500, restart_period=250, rho=0.01),
    "kana": dict(batch_size=64, lr=5e-2, num_steps=500, restart_period=250, rho=0.02),
}
# The largest seen script's training classes (CJK): every head is padded to it so all
# domains share one compiled training step (training/step.py).
HEAD_CLASSES = 280


def with_distillation(c):
    """Adds fusion by distillation (URL) to ``c``, scaled from its general-domain row.

    URL's Meta-Dataset ratios carried over: the student trains half the general domain's
    from-scratch steps (240k vs 480k) with five restart periods, batch 7x the general
    domain's per-domain batch for it (448 = 7 x 64) and 1x for every other domain (64),
    and the general domain's learning rate (3e-2 on both in URL). With the default table:
    1000 steps, restart period 200, batches CJK 448 + 4 x 64, lr 5e-2 (``:long``: 5000 / 1000).
    """
    src = c.fusion.source_domain
    row = c.per_domain[src]
    num_steps = max(1, row.num_steps // 2)
    period = max(1, num_steps // 5)
    config_lib.set_distill_recipe(
        c,
        num_steps=num_steps,
        restart_period=period,
        lr=row.lr,
        general_batch_size=7 * row.batch_size,
        other_batch_size=row.batch_size,
    )
    c.fusion.distill.validation_every = max(1, period // 2)
    modes = config_lib.fusion_modes(c)
    if "distill" not in modes:
        c.fusion.mode = ",".join((*modes, "distill"))
    return c


def get_config(arg=None):
    c = config_lib.base_config()
    c.benchmark = "glyphs"
    c.methods = ("erm", "sam")
    config_lib.with_table(c, GLYPHS_TABLE, SEEN)
    c.model = ml_collections.ConfigDict(
        dict(arch="resnet18", width=0.25, dtype="float32", lora_rank=0, head_classes=HEAD_CLASSES)
    )
    c.augment.pad = 3  # 8 px at 84 px, scaled to 28 px
    c.augment.saturation = c.augment.hue = 0.0  # grayscale glyphs
    c.validation.episodes = 100
    c.validation.every = None  # every restart period, at the end of each cosine cycle
    c.checkpoint_every = 250
    c.log_every = 50
    c.fusion.enabled = True
    c.fusion.source_domain = "cjk"
    c.fusion.mode = "full"
    c.fusion.num_steps = 250
    c.fusion.restart_period = 250
    c.fusion.lr = 1e-2
    c.evaluation.domains = SEEN + UNSEEN
    c.evaluation.episodes = 600
    # Test-time fine-tuning and TSA run the backbone at every step, too slow on a CPU for
    # the default (docs/performance.md#evaluation-cost): NCC and PA run on cached
    # embeddings, fine-tuning in ":long" (docs/evaluation.md#evaluation-that-counts).
    c.evaluation.adaptations = ("ncc", "pa")
    # PA trains a d x d map for 40 steps per task: the first 100 of the 600 episodes keep
    # it within the CPU budget (docs/performance.md#evaluation-cost); ":long" runs all 600.
    c.evaluation.pa_episodes = 100
    c.evaluation.finetune_episodes = 600
    c.evaluation.finetune_steps = 40
    # TSA (evaluation/tsa.py) is not in the default: a step costs about one fine-tuning
    # step (docs/benchmarks.md#pa-and-tsa). Add it with
    #   --config.evaluation.adaptations="('ncc','pa','tsa')"
    # for the first 10 episodes of each domain, ERM and SAM families (finetune_families).
    c.evaluation.tsa_episodes = 10
    c.evaluation.finetune_families = ("erm", "sam")
    # PARC compares all support pairs (O(S^2) plus a sort): 100 images per task suffice
    # to rank 5 backbones and keep 600 tasks x 5 backbones x 7 unseen scripts cheap.
    c.evaluation.parc_max_support = 100
    args = [a for a in (arg or "").split(",") if a]
    unknown = [a for a in args if a not in ("tiny", "long", "kd")]
    if unknown:
        raise ValueError(
            f"configs/glyphs.py takes no argument or a comma-separated list of 'tiny', "
            f"'long' and 'kd' (distillation; 'long' includes it), got {arg!r}"
        )
    if "tiny" in args:  # smoke run: every stage, minimal work
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
        c.evaluation.adaptations = ("ncc", "pa", "finetune")
        c.evaluation.finetune_episodes = 2
        c.evaluation.finetune_steps = 2
    if "long" in args:  # for a GPU/TPU: 5x the training, full fine-tuning evaluation, KD
        long_table = {
            d: dict(row, num_steps=5 * row["num_steps"]) for d, row in GLYPHS_TABLE.items()
        }
        config_lib.with_table(c, long_table, SEEN)
        c.fusion.num_steps = c.fusion.restart_period = 1000
        c.evaluation.adaptations = ("ncc", "pa", "finetune")
        c.evaluation.pa_episodes = None  # all 600
        c.evaluation.finetune_families = ()  # every family
    if "kd" in args or "long" in args:
        with_distillation(c)
    return c
