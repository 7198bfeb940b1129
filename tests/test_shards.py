"""--entries=k/n shares and per-entry locks (docs/scale.md#one-process-per-gpu)."""

import pytest

from configs import sam_resnet18
from flatfsc_jax import experiment
from flatfsc_jax import zoo as zoo_lib


def test_shares_are_disjoint_cover_the_plan_and_balance_the_paper_job():
    c = sam_resnet18.get_config()
    c.methods = ("erm", "sam")
    planned = {(p.domain, p.entry_method) for p in experiment.plan(c)}
    assert len(planned) == 16 + 14  # backbones, then +ft entries
    shares = [experiment.shard_entries(c, f"{k}/8") for k in range(8)]
    assert set().union(*shares) == planned
    assert sum(len(s) for s in shares) == len(planned)  # disjoint
    assert shares == [experiment.shard_entries(c, f"{k}/8") for k in range(8)]  # same split
    # The six 480k-step entries (ImageNet, QuickDraw, Fungi x ERM, SAM) get a GPU each.
    big = {(d, m) for d in ("ilsvrc_2012", "quickdraw", "fungi") for m in ("erm", "sam")}
    assert all(len(s & big) <= 1 for s in shares)
    for bad in ("8/8", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match=r"--entries=.* must be k/n"):
            experiment.parse_shard(bad)


def test_entry_lock_admits_one_writer_and_is_invisible_to_listings(tmp_path):
    zoo = zoo_lib.Zoo(tmp_path / "zoo")
    with zoo.entry_lock("glyphs", "latin", "sam"):
        with pytest.raises(zoo_lib.EntryLockedError, match="glyphs/latin/sam is being written"):
            with zoo.entry_lock("glyphs", "latin", "sam"):
                pass
        with zoo.entry_lock("glyphs", "latin", "erm"):  # another entry: no conflict
            pass
    with zoo.entry_lock("glyphs", "latin", "sam"):  # released
        pass
    assert zoo.list() == []
