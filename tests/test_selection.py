"""SelectionPolicy: outlier members are flagged and suggested, drift on a jump, stats."""
from __future__ import annotations

import numpy as np
import pytest

from elit_stream.core.ensemble import ActiveSet
from elit_stream.core.postprocess import FrameAnalysis, Params, analyse
from elit_stream.service.selection import PolicyConfig, SelectionPolicy
from tests.test_postprocess import probs_with


def frame(dis, mean_unc=0.05, counts=None):
    dis = np.asarray(dis, np.float32)
    empty = np.zeros(0, np.float32)
    return FrameAnalysis(empty, empty, np.zeros(0, np.uint8), empty, empty, empty,
                         np.asarray(counts if counts is not None else [10] * len(dis), np.int32),
                         dis, mean_unc)


def test_member_made_different_is_flagged_and_suggested():
    rng = np.random.default_rng(0)
    lattice = [(x, y, 0, 0.95) for x in range(8, 60, 12) for y in range(8, 44, 12)]
    members = [[(x + rng.normal(0, 0.2), y + rng.normal(0, 0.2), c, a) for x, y, c, a in lattice]
               for _ in range(5)]
    members[3] = [(x + 2.5, y - 2.0, c, a) for x, y, c, a in lattice[::2]]   # the odd one
    probs = probs_with(members)
    active = ActiveSet.full(range(5))
    policy = SelectionPolicy(PolicyConfig(outlier_frames=3), range(5))
    r = analyse(probs, active.indices, Params())
    assert np.argmax(r.disagreement_per_member) == 3
    seen = [policy.observe(r, active) for _ in range(5)]
    assert [len(a) for a in seen] == [0, 0, 1, 0, 0]           # once, at the third frame
    adv = seen[2][0]
    assert adv.kind == "outlier" and adv.members == (3,) and "3" in adv.message
    assert adv.figures["z"]["3"] > 3
    assert policy.suggest_deselect() == (3,)
    stats = policy.member_stats()
    assert stats[3]["outlier_streak"] == 5 and stats[0]["outlier_streak"] == 0
    assert stats[3]["disagreement_mean"] > stats[0]["disagreement_mean"]
    smaller = active.deselect(policy.suggest_deselect())
    assert policy.observe(analyse(probs, smaller.indices, Params()), smaller) == []
    assert policy.suggest_deselect() == ()
    assert policy.member_stats()[3]["active"] is False


def test_suggestions_keep_min_active():
    active = ActiveSet.full(range(6))
    dis = [0.05, 0.9, 0.06, 0.8, 0.05, 0.07]
    policy = SelectionPolicy(PolicyConfig(outlier_frames=1, min_active=5), range(6))
    policy.observe(frame(dis), active)
    assert policy.suggest_deselect() == (1,)                    # the worst one only
    policy = SelectionPolicy(PolicyConfig(outlier_frames=1, min_active=2), range(6))
    policy.observe(frame(dis), active)
    assert policy.suggest_deselect() == (1, 3)


def test_no_outliers_with_fewer_than_three_active():
    active = ActiveSet.full(range(4)).set_active([0, 1])
    policy = SelectionPolicy(PolicyConfig(outlier_frames=1), range(4))
    assert policy.observe(frame([0.0, 0.9, 0.0, 0.9]), active) == []
    assert policy.suggest_deselect() == ()


def test_small_equal_disagreements_are_not_outliers():
    active = ActiveSet.full(range(5))
    policy = SelectionPolicy(PolicyConfig(outlier_frames=1), range(5))
    assert policy.observe(frame([0.010, 0.011, 0.010, 0.030, 0.010]), active) == []


def test_drift_on_a_jump_once_then_rearmed():
    active = ActiveSet.full(range(3))
    policy = SelectionPolicy(PolicyConfig(window=10, min_baseline=5), range(3))
    calm, jump = [0.1, 0.1, 0.1], [0.1, 0.1, 0.1]
    for _ in range(3):
        assert policy.observe(frame(calm, 0.05), active) == []
    assert policy.observe(frame(jump, 0.5), active) == []       # baseline too short yet
    for _ in range(6):
        policy.observe(frame(calm, 0.05), active)
    adv = policy.observe(frame(jump, 0.3), active)
    assert [a.kind for a in adv] == ["drift"] and adv[0].members == (0, 1, 2)
    assert adv[0].figures["mean_uncertainty"]["value"] == pytest.approx(0.3)
    assert "mean uncertainty" in adv[0].message
    assert policy.observe(frame(jump, 0.3), active) == []       # still high: not repeated
    policy.observe(frame(calm, 0.05), active)                   # back to normal: re-armed
    assert [a.kind for a in policy.observe(frame(jump, 0.3), active)] == ["drift"]


def test_disagreement_jump_is_drift_too():
    active = ActiveSet.full(range(3))
    policy = SelectionPolicy(PolicyConfig(min_baseline=3), range(3))
    for _ in range(4):
        policy.observe(frame([0.1, 0.12, 0.11], 0.05), active)
    adv = policy.observe(frame([0.5, 0.55, 0.6], 0.05), active)
    assert [a.kind for a in adv] == ["drift"] and "mean_disagreement" in adv[0].figures


def test_active_set_change_restarts_the_baseline():
    active = ActiveSet.full(range(3))
    policy = SelectionPolicy(PolicyConfig(min_baseline=3), range(3))
    for _ in range(4):
        policy.observe(frame([0.1] * 3, 0.05), active)
    fewer = active.deselect([2])
    assert policy.observe(frame([0.1] * 3, 0.5), fewer) == []    # new set: no baseline yet


def test_member_stats_and_config_checks():
    policy = SelectionPolicy(PolicyConfig(window=4), [7, 8])
    assert policy.member_stats()[7]["frames"] == 0
    active = ActiveSet.full([7, 8])
    for k in range(6):
        policy.observe(frame([0.1 * k, 0.2], counts=[k, 3]), active)
    s = policy.member_stats()
    assert s[7]["frames"] == 4 and s[7]["count_last"] == 5
    assert s[7]["count_mean"] == pytest.approx(3.5) and s[8]["disagreement_last"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="another ensemble"):
        policy.observe(frame([0.1, 0.2]), ActiveSet.full([1, 2]))
    with pytest.raises(ValueError, match="window"):
        PolicyConfig(window=0)
