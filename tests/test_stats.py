"""evaluation/stats.py on hand-made inputs whose answers are known in closed form."""
import numpy as np
import pytest

from evaluation import stats


def pairs(only_a, only_b, both, neither):
    """Paired correctness arrays with the given cell counts of the 2 x 2 table."""
    a = [1] * only_a + [0] * only_b + [1] * both + [0] * neither
    b = [0] * only_a + [1] * only_b + [1] * both + [0] * neither
    return np.array(a), np.array(b)


# --------------------------------------------------------------------------------------------- McNemar


def test_mcnemar_ten_to_zero_discordant_pairs():
    a, b = pairs(10, 0, 30, 5)
    two = stats.mcnemar_exact(a, b)
    assert (two.n, two.only_a, two.only_b) == (45, 10, 0)
    assert two.p == pytest.approx(2 * 0.5 ** 10)
    assert stats.mcnemar_exact(a, b, "greater").p == pytest.approx(0.5 ** 10)
    assert stats.mcnemar_exact(a, b, "less").p == pytest.approx(1.0)
    assert stats.mcnemar_exact(b, a, "less").p == pytest.approx(0.5 ** 10)  # roles swap


def test_mcnemar_equal_discordance_and_no_discordance_give_p_one():
    assert stats.mcnemar_exact(*pairs(7, 7, 20, 3)).p == pytest.approx(1.0)
    same = np.array([1, 0, 1, 1])
    assert stats.mcnemar_exact(same, same).p == 1.0


def test_mcnemar_accepts_torch_and_refuses_non_binary():
    torch = pytest.importorskip("torch")
    a, b = pairs(3, 1, 2, 2)
    assert stats.mcnemar_exact(torch.tensor(a), torch.tensor(b).bool()).only_a == 3
    with pytest.raises(ValueError, match="0/1"):
        stats.mcnemar_exact([0.3, 1], [1, 0])
    with pytest.raises(ValueError, match="length"):
        stats.mcnemar_exact([1, 0], [1, 0, 1])


# ------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_contains_the_difference_matches_the_normal_width_and_shrinks_with_n():
    # 20 only-A, 10 only-B of 100: difference 10 points, SE = sqrt((0.3 - 0.1^2) / n).
    small = stats.paired_bootstrap_ci(*pairs(20, 10, 40, 30), n_boot=20000)
    large = stats.paired_bootstrap_ci(*pairs(200, 100, 400, 300), n_boot=20000)
    for ci, n in ((small, 100), (large, 1000)):
        assert ci.diff == pytest.approx(10.0)
        assert ci.low < 10 < ci.high
        normal_width = 2 * 1.959964 * np.sqrt((0.3 - 0.01) / n) * 100
        assert ci.high - ci.low == pytest.approx(normal_width, rel=0.1)
    ratio = (large.high - large.low) / (small.high - small.low)
    assert ratio == pytest.approx(1 / np.sqrt(10), rel=0.1)


def test_bootstrap_identical_arrays_give_zero_interval_and_is_deterministic():
    a = np.array([1, 0, 1, 1, 0, 1])
    ci = stats.paired_bootstrap_ci(a, a)
    assert (ci.diff, ci.low, ci.high) == (0.0, 0.0, 0.0)
    x, y = pairs(5, 3, 10, 2)
    assert stats.paired_bootstrap_ci(x, y, seed=3) == stats.paired_bootstrap_ci(x, y, seed=3)


def test_stratified_bootstrap_keeps_group_sizes():
    # Group 0: A right and B wrong on every image; group 1: they agree. If every resample keeps 10 images
    # of group 0 and 30 of group 1, the difference is 25 points in every resample: a zero-width interval.
    # Unstratified, the number drawn from group 0 varies and so does the difference.
    a = np.r_[np.ones(10), np.ones(15), np.zeros(15)]
    b = np.r_[np.zeros(10), np.ones(15), np.zeros(15)]
    groups = np.r_[np.zeros(10), np.ones(30)]
    strat = stats.paired_bootstrap_ci(a, b, groups=groups)
    assert (strat.diff, strat.low, strat.high) == (25.0, 25.0, 25.0)
    loose = stats.paired_bootstrap_ci(a, b)
    assert loose.low < 25 < loose.high


def test_clustered_bootstrap_resamples_whole_images():
    # The same 40 images under 3 seeds with identical results: the information is that of 40 images, so the
    # clustered interval matches the single-seed one, and treating 120 pairs as independent is too narrow.
    a, b = pairs(12, 4, 16, 8)
    single = stats.paired_bootstrap_ci(a, b)
    a3, b3, ids = np.tile(a, 3), np.tile(b, 3), np.tile(np.arange(40), 3)
    clustered = stats.paired_bootstrap_ci(a3, b3, clusters=ids)
    naive = stats.paired_bootstrap_ci(a3, b3)
    assert clustered.diff == single.diff == 20.0
    assert clustered.high - clustered.low == pytest.approx(single.high - single.low, rel=0.1)
    assert naive.high - naive.low < 0.7 * (clustered.high - clustered.low)
    with pytest.raises(ValueError, match="single group"):
        stats.paired_bootstrap_ci(a3, b3, clusters=ids, groups=np.repeat([0, 1, 2], 40))


# ----------------------------------------------------------------------------------------------- loss


def test_loss_tests_on_a_constant_shift():
    b = 0.5 + 0.25 * np.arange(12)  # multiples of 1/4: the differences are exact
    a = b - 0.25                    # A lower by 0.25 nats on every image
    res = stats.paired_loss_test(a, b)
    assert res.mean_diff == pytest.approx(-0.25)
    assert res.wilcoxon_p == pytest.approx(2 * 0.5 ** 12)  # exact: all 12 signs negative
    assert res.t_p < 1e-6
    less = stats.paired_loss_test(a, b, alternative="less")
    assert less.wilcoxon_p == pytest.approx(0.5 ** 12) and less.t_p == 0.0
    greater = stats.paired_loss_test(a, b, alternative="greater")
    assert greater.wilcoxon_p == pytest.approx(1.0) and greater.t_p == 1.0
    noisy = stats.paired_loss_test(a + np.tile([0.01, -0.01], 6), b)  # not constant: scipy's t-test
    assert noisy.mean_diff == pytest.approx(-0.25) and noisy.t_p < 1e-10


def test_loss_tests_without_a_shift():
    b = np.linspace(0.5, 3.0, 12)
    assert stats.paired_loss_test(b, b.copy()) == stats.LossTest(12, 0.0, 1.0, 1.0, "two-sided")
    # Symmetric differences: mean zero, t statistic zero, Wilcoxon W at its centre.
    res = stats.paired_loss_test(b + np.tile([0.1, -0.1], 6), b)
    assert res.mean_diff == pytest.approx(0.0, abs=1e-12)
    assert res.t_p == pytest.approx(1.0)
    assert res.wilcoxon_p > 0.5


# ------------------------------------------------------------------------------------- shuffle control


def test_route_table_recovers_routes():
    routes = np.array([[1, 0, 1], [1, 1, 1], [1, 0, 1], [0, 0, 1]])
    distinct, assign = stats.route_table(routes)
    assert distinct.shape == (3, 3)
    assert np.array_equal(distinct[assign], routes)


def test_shuffle_control_perfect_routing_beats_its_shuffles():
    # Image i is right only under route i % 2 and gets it: 100%; a shuffled image keeps its route with
    # probability 1/2 (10 of each route), so the shuffles average 50%.
    n = 20
    assign = np.arange(n) % 2
    correct = np.eye(2, dtype=int)[assign]
    res = stats.shuffle_control(correct, assign, n_perm=2000)
    assert res.acc_assigned == 1.0
    assert res.acc_shuffled == pytest.approx(0.5, abs=0.02)
    assert res.high < 1.0 and res.std > 0
    assert res.p == pytest.approx(1 / 2001)


def test_shuffle_control_identical_routes_change_nothing():
    rng = np.random.default_rng(0)
    col = rng.integers(0, 2, 30)
    correct = np.stack([col, col, col], axis=1)
    assign = rng.integers(0, 3, 30)
    res = stats.shuffle_control(correct, assign, n_perm=200)
    assert res.acc_shuffled == res.acc_assigned == col.mean()
    assert res.std == 0.0 and res.p == 1.0


def test_shuffle_control_within_groups():
    # The route is a function of the group (e.g. difficulty level): shuffling within groups cannot change
    # the assignment, so per-image routing adds nothing beyond routing by group; shuffled overall it does.
    n = 20
    group = np.arange(n) % 2
    correct = np.eye(2, dtype=int)[group]
    within = stats.shuffle_control(correct, group, groups=group, n_perm=200)
    assert within.acc_shuffled == within.acc_assigned == 1.0 and within.p == 1.0
    overall = stats.shuffle_control(correct, group, n_perm=200)
    assert overall.acc_shuffled < 0.6


def test_shuffle_control_keeps_route_counts_per_group():
    # A permutation within groups keeps each group's route counts; check via a matrix where correctness
    # depends only on the route, so every shuffle scores exactly the assigned accuracy.
    assign = np.array([0, 0, 1, 2, 2, 2, 1, 0])
    correct = np.tile([[1, 0, 1]], (8, 1))
    res = stats.shuffle_control(correct, assign, groups=[0, 0, 0, 0, 1, 1, 1, 1], n_perm=50)
    assert res.low == res.high == res.acc_assigned == 6 / 8


# ---------------------------------------------------------------------------------------------- oracle


def test_two_route_oracle_on_three_routes():
    correct = np.array([[1, 0, 1],
                        [1, 0, 1],
                        [0, 1, 1],
                        [0, 1, 0]])  # test accuracies 0.5, 0.5, 0.75
    val_acc = [0.90, 0.895, 0.85]
    res = stats.two_route_oracle(correct, val_acc, full_acc=0.91, within=(0.5, 1, 2, 10))
    assert res[0.5] is None                      # nothing within half a point
    one = res[1]                                 # only route 0 (exactly at the boundary)
    assert one.admissible == (0,) and one.pair == (0, 0) and one.headroom == 0.0
    two = res[2]                                 # routes 0 and 1: complementary, either is always right
    assert two.admissible == (0, 1) and two.pair == (0, 1)
    assert (two.oracle_acc, two.random_acc, two.best_single_acc) == (1.0, 0.5, 0.5)
    assert two.headroom == pytest.approx(50.0)
    ten = res[10]                                # all three: (0, 1) and (1, 2) both reach 100%; the tie
    assert ten.pair == (1, 2)                    # goes to the higher random accuracy, the smaller headroom
    assert (ten.oracle_acc, ten.random_acc, ten.best_single_acc) == (1.0, 0.625, 0.75)
    assert ten.headroom == pytest.approx(37.5)


# ------------------------------------------------------------------------------------------- cross-fit


def test_cross_fit_splits_partition_and_disjointness():
    n, folds, seeds = 103, 5, (0, 1, 2)
    splits = stats.cross_fit_splits(n, folds=folds, seeds=seeds, val_fraction=0.1)
    assert [(s.seed, s.fold) for s in splits] == [(s, f) for s in seeds for f in range(folds)]
    for seed in seeds:
        mine = [s for s in splits if s.seed == seed]
        tests = np.concatenate([s.test for s in mine])
        assert np.array_equal(np.sort(tests), np.arange(n))          # every image is test exactly once
        assert max(s.test.size for s in mine) - min(s.test.size for s in mine) <= 1
        for s in mine:
            assert not set(s.train) & set(s.val)
            assert not set(s.train) & set(s.test)
            assert not set(s.val) & set(s.test)
            assert np.array_equal(np.sort(np.r_[s.train, s.val, s.test]), np.arange(n))
            others = np.concatenate([o.test for o in mine if o.fold != s.fold])
            assert set(s.val) <= set(others)                          # val comes from the training folds
            assert s.val.size == round(0.1 * (n - s.test.size))


def test_cross_fit_splits_stratified_and_deterministic():
    labels = np.repeat(["a", "b", "c"], [50, 31, 12])
    n = labels.size
    splits = stats.cross_fit_splits(n, folds=5, seeds=(0, 1), val_fraction=0.2, labels=labels)
    for s in splits:
        for c, n_c in (("a", 50), ("b", 31), ("c", 12)):
            assert abs(np.sum(labels[s.test] == c) - n_c / 5) < 1          # within one image
            pool = n - s.test.size
            share = np.sum(labels[s.train] == c) + np.sum(labels[s.val] == c)
            assert abs(np.sum(labels[s.val] == c) - s.val.size * share / pool) <= 1
    again = stats.cross_fit_splits(n, folds=5, seeds=(0, 1), val_fraction=0.2, labels=labels)
    for s, t in zip(splits, again):
        assert all(np.array_equal(getattr(s, k), getattr(t, k)) for k in ("train", "val", "test"))
    assert not np.array_equal(splits[0].test, splits[5].test)              # seeds differ


# ------------------------------------------------------------------------------------------ reporting


def test_power_note_formula():
    note = stats.power_note(0.2, 1000)
    assert note["mdd"] == pytest.approx((1.959964 + 0.841621) * np.sqrt(0.2 / 1000) * 100, rel=1e-5)
    assert "1000 paired images" in note["text"]


def test_pooled_report_pools_parts():
    a1, b1 = pairs(6, 0, 10, 4)
    a2, b2 = pairs(4, 0, 12, 4)
    rep = stats.pooled_report([a1, a2], [b1, b2], n_boot=2000)
    assert (rep["n"], rep["n_images"]) == (40, 40)
    assert (rep["acc_a"], rep["acc_b"]) == (0.8, 0.55)
    assert rep["mcnemar"]["only_a"] == 10 and rep["mcnemar"]["p"] == pytest.approx(2 * 0.5 ** 10)
    assert rep["diff"] == 25.0 and rep["ci"]["low"] < 25 < rep["ci"]["high"]
    assert rep["power"]["discordance"] == 0.25 and rep["power"]["n"] == 40
    clustered = stats.pooled_report([a1, a1], [b1, b1], image_ids=[np.arange(20)] * 2, n_boot=2000)
    assert clustered["n"] == 40 and clustered["n_images"] == 20 and clustered["power"]["n"] == 20


def test_unit_bootstrap_carries_the_variance_between_units():
    rng = np.random.default_rng(0)
    same = [rng.random(400) < 0.9 for _ in range(6)]
    zero = stats.unit_bootstrap_ci(same, same, n_boot=2000)
    assert (zero.diff, zero.low, zero.high, zero.se) == (0.0, 0.0, 0.0, 0.0)
    # units that disagree (three +10 points, three -10): the pooled difference is 0 either way, but the
    # interval over units must be far wider than the one that holds the trained units fixed
    a = [rng.random(400) < p for p in (0.95, 0.75, 0.95, 0.75, 0.95, 0.75)]
    b = [rng.random(400) < 0.85 for _ in range(6)]
    units = stats.unit_bootstrap_ci(a, b, n_boot=4000)
    images = stats.paired_bootstrap_ci(np.concatenate(a), np.concatenate(b), n_boot=4000)
    assert units.low < units.diff < units.high and units.diff == pytest.approx(images.diff)
    assert units.high - units.low > 1.5 * (images.high - images.low)
    assert units.mdd == pytest.approx(2.8016 * units.se, rel=1e-3) and units.units == 6
    assert stats.unit_bootstrap_ci(a, b, n_boot=4000) == units  # deterministic
