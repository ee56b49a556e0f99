"""Paired statistics and cross-fitting for asking whether per-image routing beats a fixed route.

Every comparison here is paired: system A (e.g. per-image routing) and system B (e.g. the best fixed route at
the same GFLOPs) are evaluated on the same test images, so the per-image differences carry the signal and the
image-to-image variation in difficulty cancels. Unpaired tests on the two accuracies would waste that.

    mcnemar_exact        exact McNemar test on paired 0/1 correctness (binomial test on the discordant pairs)
    paired_bootstrap_ci  percentile bootstrap CI of the accuracy difference, optionally stratified / clustered
    unit_bootstrap_ci    the same over trained units: units resampled, then images within each (training variance)
    paired_loss_test     Wilcoxon signed-rank and paired t on per-image cross-entropy
    route_table          (N, S) per-image routes -> distinct routes and each image's route index
    shuffle_control      the same routes shuffled across images (overall or within groups): a permutation test
    pooled_shuffle       the same over several test sets (folds x seeds), each shuffled within itself
    two_route_oracle     headroom of the best pair of admissible routes over assigning them at random
    cross_fit_splits     (train, val, test) per seed and fold; every image is test exactly once per seed
    pooled_report        pools per-(fold, seed) results: accuracies, McNemar, bootstrap CI and power
    power_note           minimum detectable difference of a two-sided McNemar test

Units: accuracies are fractions in [0, 1]; differences between accuracies, tolerances and minimum detectable
differences are in percentage points. Inputs may be numpy arrays, lists or torch tensors (any device).
This module imports nothing from the project's scripts.
"""
from dataclasses import asdict, dataclass
from itertools import combinations

import numpy as np
from scipy import stats

ALTERNATIVES = ("two-sided", "greater", "less")


def _np(x):
    """A numpy view of x; torch tensors are detached and moved to the CPU (duck-typed so that importing this
    module does not pay for importing torch)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _binary(x, name):
    """x as a 1-D bool array, refusing anything that is not 0/1 correctness (a probability or a count
    passed by mistake would otherwise be silently thresholded)."""
    x = _np(x)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of 0/1, got shape {x.shape}")
    if x.dtype != bool and not np.isin(x, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0/1 (correct or not)")
    return x.astype(bool)


def _pair(a, b):
    a, b = _binary(a, "a_correct"), _binary(b, "b_correct")
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in length: {a.size} and {b.size}")
    return a, b


def _check_alternative(alternative):
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")


# --------------------------------------------------------------------------------------------- McNemar


@dataclass(frozen=True)
class McNemar:
    n: int            # paired images
    only_a: int       # b01: A right, B wrong
    only_b: int       # b10: B right, A wrong
    p: float
    alternative: str  # "greater" tests A better than B

    @property
    def discordance(self):
        """Fraction of images on which A and B disagree; what the test's power depends on."""
        return (self.only_a + self.only_b) / self.n


def mcnemar_exact(a_correct, b_correct, alternative="two-sided"):
    """Exact McNemar test of paired correctness: under H0 (equal accuracy) each discordant pair is equally
    likely to favour A or B, so only_a ~ Binomial(only_a + only_b, 1/2). Concordant pairs carry no
    information about the difference and are ignored. alternative="greater" tests A better than B.
    With no discordant pairs there is no evidence either way: p = 1."""
    _check_alternative(alternative)
    a, b = _pair(a_correct, b_correct)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    k = only_a + only_b
    p = 1.0 if k == 0 else float(stats.binomtest(only_a, k, 0.5, alternative=alternative).pvalue)
    return McNemar(n=int(a.size), only_a=only_a, only_b=only_b, p=p, alternative=alternative)


# ------------------------------------------------------------------------------------------ bootstrap


@dataclass(frozen=True)
class BootstrapCI:
    diff: float   # observed accuracy difference A - B, points
    low: float    # percentile interval, points
    high: float
    level: float
    n_boot: int


def _resampled_ratio(num, den, strata, n_boot, rng):
    """Bootstrap distribution of sum(num) / sum(den) when units are resampled with replacement within each
    stratum, each stratum keeping its size.

    Drawing n_s units with replacement from a stratum is a multinomial draw over its units, and units with
    the same (num, den) are interchangeable, so it is exactly a multinomial draw over the distinct (num, den)
    values with their frequencies. Paired 0/1 differences take only three values (-1, 0, 1), so this costs
    O(n_boot) per stratum instead of the O(n_boot * n) index matrix of a literal resample (10,000 x 10,000
    images would be 800 MB of indices), and it is the same distribution, not an approximation."""
    total_num = np.zeros(n_boot)
    total_den = np.zeros(n_boot)
    for s in np.unique(strata):
        keep = strata == s
        values, counts = np.unique(np.stack([num[keep], den[keep]], axis=1), axis=0, return_counts=True)
        draws = rng.multinomial(counts.sum(), counts / counts.sum(), size=n_boot)  # (n_boot, distinct)
        total_num += draws @ values[:, 0]
        total_den += draws @ values[:, 1]
    return total_num / total_den


def paired_bootstrap_ci(a_correct, b_correct, n_boot=10000, level=0.95, seed=0, groups=None, clusters=None):
    """Percentile bootstrap CI of the accuracy difference A - B (points), resampling images as pairs so the
    pairing is kept.

    groups: optional per-image stratum (e.g. the fold x seed a result came from); images are resampled within
    each stratum, so every resample keeps the strata's sizes, as pooled folds and seeds had fixed sizes.
    clusters: optional per-pair unit id (e.g. the image id when the same image was tested under several
    seeds); whole clusters are resampled together, because repeated results for one image are not
    independent and resampling them separately would give too narrow an interval. A cluster must lie in a
    single group.

    scipy.stats.bootstrap is not used: it can neither stratify nor cluster. The resampling is exact and
    vectorized (see _resampled_ratio), driven by numpy's Generator seeded with seed, so it is deterministic."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    a, b = _pair(a_correct, b_correct)
    d = a.astype(np.int64) - b.astype(np.int64)
    strata = np.zeros(d.size, dtype=np.int64) if groups is None else _labels(groups, d.size, "groups")
    if clusters is None:
        num, den = d, np.ones_like(d)
    else:
        ids = _labels(clusters, d.size, "clusters")
        uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        if not np.array_equal(strata, strata[first][inverse]):
            raise ValueError("each cluster must lie in a single group")
        num = np.bincount(inverse, weights=d).astype(np.int64)       # summed difference per cluster
        den = np.bincount(inverse, minlength=uniq.size).astype(np.int64)  # pairs per cluster
        strata = strata[first]
    boot = _resampled_ratio(num, den, strata, n_boot, np.random.default_rng(seed)) * 100
    tail = (1 - level) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    return BootstrapCI(diff=float(d.mean() * 100), low=float(low), high=float(high), level=level, n_boot=n_boot)


@dataclass(frozen=True)
class UnitBootstrap:
    diff: float   # pooled accuracy difference A - B over every unit's images, points
    low: float    # percentile interval, points
    high: float
    se: float     # standard deviation of the bootstrap distribution, points
    mdd: float    # smallest difference a two-sided test at 5% detects with 80% power: 2.80 * se, points
    units: int
    level: float
    n_boot: int


def unit_bootstrap_ci(a_parts, b_parts, n_boot=10000, level=0.95, seed=0):
    """Two-level percentile bootstrap of the pooled accuracy difference A - B over several units (a unit:
    one trained pair of systems, e.g. a fold x seed of a cross-fitting, tested on its own images): draw
    the units with replacement, then within every drawn unit its images (pairs) with replacement, and pool.
    The interval carries the variance of training runs (which units came out well) as well as that of the
    images, unlike paired_bootstrap_ci, which holds the trained systems fixed. Exact and vectorized as
    _resampled_ratio: a unit's paired 0/1 differences take three values, so its image resample is a
    multinomial draw over them. Deterministic given seed."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if len(a_parts) != len(b_parts) or not a_parts:
        raise ValueError("need the same positive number of A and B parts")
    counts, sizes = [], []
    for a, b in zip(a_parts, b_parts):
        a, b = _pair(a, b)
        d = a.astype(np.int64) - b.astype(np.int64)
        counts.append([(d == -1).sum(), (d == 0).sum(), (d == 1).sum()])
        sizes.append(d.size)
    counts, sizes = np.array(counts, dtype=float), np.array(sizes)
    rng = np.random.default_rng(seed)
    k = len(sizes)
    drawn = rng.integers(0, k, size=(n_boot, k))  # the units of each resample
    num = np.zeros(n_boot)
    for u in range(k):  # every time unit u is drawn, a fresh multinomial resample of its images
        times = (drawn == u).sum(1)
        total = int(times.sum())
        if total:
            draws = rng.multinomial(sizes[u], counts[u] / sizes[u], size=total) @ np.array([-1.0, 0.0, 1.0])
            num += np.bincount(np.repeat(np.arange(n_boot), times), weights=draws, minlength=n_boot)
    den = sizes[drawn].sum(1)
    boot = num / den * 100
    tail = (1 - level) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    diff = float((counts[:, 2].sum() - counts[:, 0].sum()) / sizes.sum() * 100)
    se = float(boot.std(ddof=1)) if n_boot > 1 else 0.0
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    return UnitBootstrap(diff=diff, low=float(low), high=float(high), se=se, mdd=float(z * se), units=k,
                         level=level, n_boot=n_boot)


def _labels(x, n, name):
    x = _np(x)
    if x.shape != (n,):
        raise ValueError(f"{name} must have one entry per pair ({n}), got shape {x.shape}")
    return np.unique(x, return_inverse=True)[1].reshape(n)  # any hashable labels -> 0..k-1


# ------------------------------------------------------------------------------------------------ loss


@dataclass(frozen=True)
class LossTest:
    n: int
    mean_diff: float     # mean of a_loss - b_loss (nats); negative = A has the lower loss
    wilcoxon_p: float
    t_p: float
    alternative: str


def paired_loss_test(a_loss, b_loss, alternative="two-sided"):
    """Paired tests on per-image cross-entropy, a finer signal than 0/1 correctness (it moves even when the
    argmax does not). Wilcoxon signed-rank (no normality assumption; robust to the heavy right tail of
    cross-entropy) and the paired t-test (tests the mean, which is what the average loss reports).
    alternative applies to a_loss - b_loss, as in scipy: "less" tests A's loss lower than B's.
    If every difference is zero both p-values are 1 (scipy would return nan for the t-test); a constant
    nonzero shift gives a t-test p of 0 (1 for the one-sided test against its direction)."""
    _check_alternative(alternative)
    a, b = _np(a_loss).astype(float), _np(b_loss).astype(float)
    if a.ndim != 1 or a.shape != b.shape or a.size < 2:
        raise ValueError(f"need two 1-D loss arrays of equal length >= 2, got {a.shape} and {b.shape}")
    d = a - b
    if not np.any(d):
        return LossTest(n=int(a.size), mean_diff=0.0, wilcoxon_p=1.0, t_p=1.0, alternative=alternative)
    w = stats.wilcoxon(a, b, alternative=alternative)
    if np.all(d == d[0]):
        # A constant nonzero shift: zero variance, an infinite t statistic (scipy gets there too, but warns
        # about precision loss); the shift's direction decides a one-sided test.
        away = {"two-sided": True, "greater": d[0] > 0, "less": d[0] < 0}[alternative]
        t_p = 0.0 if away else 1.0
    else:
        t_p = float(stats.ttest_rel(a, b, alternative=alternative).pvalue)
    return LossTest(n=int(a.size), mean_diff=float(d.mean()), wilcoxon_p=float(w.pvalue), t_p=t_p,
                    alternative=alternative)


# ------------------------------------------------------------------------------------- shuffle control


def route_table(routes):
    """(N, S) 0/1 per-image routes (1 = block executed) -> (distinct routes (R, S), assign (N,)) with
    routes[i] == distinct[assign[i]]. To build shuffle_control's correct[i, r], evaluate every image under
    each distinct route (a fixed route applied to the whole test set)."""
    routes = _np(routes)
    if routes.ndim != 2:
        raise ValueError(f"routes must be (images, switches), got shape {routes.shape}")
    distinct, assign = np.unique(routes.astype(np.int8), axis=0, return_inverse=True)
    return distinct, assign.reshape(-1)


@dataclass(frozen=True)
class ShuffleControl:
    acc_assigned: float   # accuracy of the per-image assignment
    acc_shuffled: float   # mean accuracy over the shuffled assignments
    std: float            # their spread (sample std over permutations)
    low: float            # 2.5% and 97.5% quantiles of the shuffled accuracies
    high: float
    p: float              # permutation p-value: P(shuffled >= assigned), one-sided
    n_perm: int


def shuffle_hits(correct, assign, groups=None, n_perm=1000, seed=0, chunk=256):
    """(hits of the assignment, hits of each of n_perm shuffles (n_perm,)): the integer counts behind
    shuffle_control, so that independent shuffles of several test sets (folds, seeds) add up to a
    shuffle of the pooled one (pooled_shuffle)."""
    correct = _np(correct)
    if correct.ndim != 2 or not np.isin(correct, (0, 1)).all():
        raise ValueError(f"correct must be an (images, routes) 0/1 matrix, got shape {correct.shape}")
    correct = correct.astype(np.int64)
    n, r = correct.shape
    assign = _np(assign).astype(np.int64)
    if assign.shape != (n,) or assign.min() < 0 or assign.max() >= r:
        raise ValueError(f"assign must be ({n},) route indices in [0, {r})")
    if n_perm < 1:
        raise ValueError(f"n_perm must be positive, got {n_perm}")
    strata = np.zeros(n, dtype=np.int64) if groups is None else _labels(groups, n, "groups")
    members = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    rows = np.arange(n)
    rng = np.random.default_rng(seed)
    hits = np.empty(n_perm, dtype=np.int64)
    for start in range(0, n_perm, chunk):  # chunks bound the (perms x images) index matrix
        k = min(chunk, n_perm - start)
        source = np.empty((k, n), dtype=np.int64)  # source[j, i]: the image whose route image i receives
        for idx in members:
            source[:, idx] = rng.permuted(np.tile(idx, (k, 1)), axis=1)
        hits[start:start + k] = correct[rows, assign[source]].sum(axis=1)
    return int(correct[rows, assign].sum()), hits


def _shuffle_summary(hits_assigned, hits, n):
    # Integer counts, not float accuracies, so that "shuffled >= assigned" is an exact comparison, and
    # identical shuffles report exactly the assigned accuracy.
    low, high = np.quantile(hits, [0.025, 0.975]) / n
    return ShuffleControl(
        acc_assigned=hits_assigned / n, acc_shuffled=float(hits.mean() / n),
        std=float(hits.std(ddof=1) / n) if hits.size > 1 else 0.0, low=float(low), high=float(high),
        p=float((1 + np.sum(hits >= hits_assigned)) / (1 + hits.size)), n_perm=int(hits.size))


def shuffle_control(correct, assign, groups=None, n_perm=1000, seed=0, chunk=256):
    """The control "same routes, shuffled across images": does it matter WHICH image gets which route, or
    only how often each route is used?

    correct: (N, R) 0/1, image i correct under candidate route r (each route evaluated on every image).
    assign:  (N,) the route index the router chose for each image (see route_table).
    groups:  optional (N,) labels (e.g. difficulty levels); shuffling is then done within each group, which
             asks whether routing beats merely routing by group.

    A permutation keeps the multiset of routes exactly (within each group too), hence the average cost in
    GFLOPs, so the comparison is at equal cost. Returns the assigned accuracy, the shuffled accuracies' mean,
    spread and 95% range over n_perm permutations, and the one-sided permutation p-value
    (1 + #{shuffled >= assigned}) / (1 + n_perm)."""
    assigned, hits = shuffle_hits(correct, assign, groups, n_perm, seed, chunk)
    return _shuffle_summary(assigned, hits, len(_np(assign)))


def pooled_shuffle(parts, n_perm=1000, seed=0):
    """shuffle_control over several test sets, each shuffled within itself: parts is a list of (correct,
    assign, groups or None) (one per fold x seed, each with its own routes); the k-th shuffles of all parts
    add up to the k-th shuffle of the pool."""
    total, hits, n = 0, np.zeros(n_perm, dtype=np.int64), 0
    for k, (correct, assign, groups) in enumerate(parts):
        a, h = shuffle_hits(correct, assign, groups, n_perm, seed + k)
        total, hits, n = total + a, hits + h, n + len(_np(assign))
    return _shuffle_summary(total, hits, n)


# ---------------------------------------------------------------------------------------------- oracle


@dataclass(frozen=True)
class TwoRouteOracle:
    within: float              # tolerance, points below the full network on validation
    admissible: tuple          # route indices within the tolerance
    pair: tuple                # the two routes (the same index twice when only one is admissible)
    oracle_acc: float          # test accuracy when each image gets whichever of the pair is right
    random_acc: float          # the pair assigned at random, 50/50: mean of the two columns
    best_single_acc: float     # the best admissible route alone on test
    headroom: float            # oracle_acc - random_acc, points


def two_route_oracle(correct, val_acc, full_acc, within=(2, 5)):
    """Upper bound on what routing between two routes could gain, for cheap routes that a user would accept.

    correct: (N, R) 0/1 test correctness of R candidate routes; val_acc: (R,) their validation accuracies;
    full_acc: the full network's validation accuracy; within: one tolerance or several, in points.
    Routes with val_acc >= full_acc - within are admissible (chosen on validation, not test). Among admissible
    pairs the one maximising test accuracy of "right if either is right" is taken; ties go to the pair with
    the higher random accuracy, so the reported headroom is the smaller one. This is an oracle (it looks at
    the test labels): if even its headroom over random assignment is small, no router can do much better.
    Returns {tolerance: TwoRouteOracle}, None for a tolerance with no admissible route."""
    correct = _np(correct)
    if correct.ndim != 2 or not np.isin(correct, (0, 1)).all():
        raise ValueError(f"correct must be an (images, routes) 0/1 matrix, got shape {correct.shape}")
    correct = correct.astype(np.int64)
    val_acc = _np(val_acc).astype(float)
    if val_acc.shape != (correct.shape[1],):
        raise ValueError(f"val_acc must have one entry per route ({correct.shape[1]}), got {val_acc.shape}")
    test_acc = correct.mean(axis=0)
    out = {}
    for tol in np.atleast_1d(within).tolist():
        # A hair of slack so that a route exactly at the boundary is not lost to float rounding.
        admissible = np.flatnonzero(val_acc * 100 >= float(full_acc) * 100 - tol - 1e-9)
        if admissible.size == 0:
            out[tol] = None
            continue
        pairs = list(combinations(admissible.tolist(), 2)) or [(int(admissible[0]),) * 2]
        best = max(pairs, key=lambda p: (np.mean(correct[:, p[0]] | correct[:, p[1]]),
                                          test_acc[p[0]] + test_acc[p[1]]))
        oracle = float(np.mean(correct[:, best[0]] | correct[:, best[1]]))
        rand = float((test_acc[best[0]] + test_acc[best[1]]) / 2)
        out[tol] = TwoRouteOracle(within=tol, admissible=tuple(admissible.tolist()), pair=tuple(best),
                                  oracle_acc=oracle, random_acc=rand,
                                  best_single_acc=float(test_acc[admissible].max()),
                                  headroom=(oracle - rand) * 100)
    return out


# -------------------------------------------------------------------------------------------- cross-fit


@dataclass(frozen=True)
class Split:
    seed: int
    fold: int
    train: np.ndarray   # sorted image indices
    val: np.ndarray
    test: np.ndarray


def cross_fit_splits(n, folds=5, seeds=(0, 1, 2), val_fraction=0.1, labels=None):
    """Cross-fitting splits: for each seed, the images are dealt into `folds` test folds that partition
    range(n); for each fold the other folds are the training pool, from which a validation set of
    round(val_fraction * pool) images is drawn (stratified when labels are given) and the rest is train.
    So every image is tested exactly once per seed, by a model that never saw it, and the routing/threshold
    choices made on validation never touch the test fold. Deterministic given the seed.

    Stratified (labels given): each class's images, shuffled, are dealt round-robin into the folds in one
    sequence, so every fold holds each class within one image of n_class / folds and fold sizes differ by at
    most one. Returns a list of Split, seeds outer, folds inner."""
    if folds < 2 or n < folds:
        raise ValueError(f"need 2 <= folds <= n, got folds={folds}, n={n}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    y = None if labels is None else _labels(labels, n, "labels")
    splits = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        order = _stratified_order(y, rng) if y is not None else rng.permutation(n)
        fold_of = np.empty(n, dtype=np.int64)
        fold_of[order] = np.arange(n) % folds
        for fold in range(folds):
            test = np.flatnonzero(fold_of == fold)
            pool = np.flatnonzero(fold_of != fold)
            m = int(round(val_fraction * pool.size))
            if y is not None:
                val = pool[_proportional_head(y[pool], m, rng)]
            else:
                val = rng.choice(pool, size=m, replace=False)
            train = np.setdiff1d(pool, val)
            splits.append(Split(seed=int(seed), fold=fold, train=train, val=np.sort(val), test=test))
    return splits


def _stratified_order(y, rng):
    """All indices, class after class, each class shuffled: dealing this sequence round-robin spreads every
    class evenly over the folds (a class's run of consecutive positions hits each fold floor or ceil
    times)."""
    return np.concatenate([rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)])


def _proportional_head(y, m, rng):
    """Positions of a stratified random subset of size m of labels y: each class's members, shuffled, get
    evenly spaced keys (j + 0.5) / n_class, and the m smallest keys are taken (ties broken at random), so
    every class gets m * n_class / n images up to rounding (systematic stratified sampling)."""
    keys = np.empty(y.size)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        keys[idx] = (np.arange(idx.size) + 0.5) / idx.size
    return np.lexsort((rng.random(y.size), keys))[:m]


# ------------------------------------------------------------------------------------------ reporting


def power_note(discordance, n, alpha=0.05, power=0.8):
    """Minimum detectable accuracy difference (points) of a two-sided McNemar test at level alpha with the
    given power, normal approximation: the per-image difference has variance ~ discordance (the fraction of
    discordant pairs, for small differences), so delta = (z_{1-alpha/2} + z_power) * sqrt(discordance / n).
    A difference smaller than this being "not significant" is not evidence that there is none."""
    if n <= 0 or not 0 <= discordance <= 1:
        raise ValueError(f"need n > 0 and discordance in [0, 1], got n={n}, discordance={discordance}")
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    mdd = float(z * np.sqrt(discordance / n) * 100)
    return {"mdd": mdd, "discordance": float(discordance), "n": int(n), "alpha": alpha, "power": power,
            "text": f"with {n} paired images and {discordance:.1%} discordant, a two-sided McNemar test at "
                    f"alpha {alpha} detects a difference of {mdd:.2f} points with {power:.0%} power"}


def pooled_report(a_parts, b_parts, image_ids=None, n_boot=10000, level=0.95, seed=0, alternative="two-sided",
                  alpha=0.05, power=0.8):
    """Pool per-(fold, seed) paired correctness arrays (a_parts[k], b_parts[k] for the k-th fold x seed) into
    one report, a JSON-ready dict: n, acc_a, acc_b, diff (points), mcnemar, ci, power.

    Without image_ids the bootstrap is stratified by part (each fold x seed keeps its size). Across seeds
    the same image is tested once per seed, so pooled pairs are not independent: pass image_ids (the test
    indices of each part, e.g. Split.test) and the bootstrap resamples whole images (all their seeds
    together) and the power is computed on the distinct images (conservative: as if the seeds' results were
    perfectly correlated). The McNemar p-value always treats pooled pairs as independent, which is exact for
    one seed and optimistic over several; the clustered CI is then the one to quote."""
    if len(a_parts) != len(b_parts) or not a_parts:
        raise ValueError("need the same positive number of A and B parts")
    pairs = [_pair(a, b) for a, b in zip(a_parts, b_parts)]
    a = np.concatenate([p[0] for p in pairs])
    b = np.concatenate([p[1] for p in pairs])
    part = np.concatenate([np.full(p[0].size, k) for k, p in enumerate(pairs)])
    if image_ids is None:
        ci = paired_bootstrap_ci(a, b, n_boot=n_boot, level=level, seed=seed, groups=part)
        n_units = a.size
    else:
        if len(image_ids) != len(pairs):
            raise ValueError("need one image_ids array per part")
        ids = np.concatenate([_np(i).reshape(-1) for i in image_ids])
        if ids.size != a.size:
            raise ValueError("image_ids must have one id per paired result")
        ci = paired_bootstrap_ci(a, b, n_boot=n_boot, level=level, seed=seed, clusters=ids)
        n_units = np.unique(ids).size
    test = mcnemar_exact(a, b, alternative=alternative)
    return {"n": int(a.size), "n_images": int(n_units), "acc_a": float(a.mean()), "acc_b": float(b.mean()),
            "diff": ci.diff, "mcnemar": asdict(test), "ci": asdict(ci),
            "power": power_note(test.discordance, n_units, alpha=alpha, power=power)}
