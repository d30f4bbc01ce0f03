"""The study statistics, each checked against an independent computation (scikit-learn,
scipy, or a case worked by hand), and bootstrap intervals checked for coverage."""

import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression

from meddiag.evaluation import stats


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300).astype(bool)
    s = np.round(rng.normal(y * 1.2, 1.0), 1)  # rounding makes ties on purpose
    return y, s


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (81, 263), (450, 500)])
def test_wilson_interval_matches_scipy(k, n):
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert stats.wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))


def test_curves_and_areas_match_sklearn(scores):
    y, s = scores
    fpr, tpr, thr = stats.roc_curve(y, s)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert stats.average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    recall, precision = stats.precision_recall_curve(y, s)
    sk_p, sk_r, _ = skm.precision_recall_curve(y, s)
    np.testing.assert_allclose(recall, sk_r[::-1][1:])
    np.testing.assert_allclose(precision, sk_p[::-1][1:])


def test_micro_auc_matches_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 200)
    probs = rng.dirichlet([1, 1, 1], 200) + np.eye(3)[labels] * 0.3
    probs /= probs.sum(1, keepdims=True)
    onehot = np.eye(3)[labels]
    assert stats.micro_auc(onehot, probs) == pytest.approx(skm.roc_auc_score(onehot, probs, average="micro"), abs=1e-12)


def test_thresholds_by_hand():
    y = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1, 1], bool)
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    # At 0.5: sens 5/5, spec 4/5 -> J 0.8, the maximum (0.7 gives 4/5 and 5/5: also 0.8, the higher wins).
    assert stats.choose_threshold(y, s, "youden") == 0.7
    assert stats.choose_threshold(y, s, "sens95") == 0.5  # only thresholds <= 0.5 catch all five
    assert stats.choose_threshold(y, s, "sens90") == 0.5  # 4/5 = 0.8 < 0.9 at 0.7
    assert stats.choose_threshold(y, s, "spec90") == 0.7  # 0.6 lets a negative through: spec 0.8
    table = stats.binary_table(y, s, 0.5)
    assert (table["tp"], table["fp"], table["tn"], table["fn"]) == (5, 1, 4, 0)
    assert table["sensitivity"] == 1.0 and table["specificity"] == 0.8 and table["ppv"] == pytest.approx(5 / 6)
    assert table["npv"] == 1.0 and table["f1"] == pytest.approx(10 / 11)
    assert table["specificity_ci"] == pytest.approx(stats.wilson_interval(4, 5))
    with pytest.raises(ValueError, match="unknown operating point"):
        stats.choose_threshold(y, s, "best")


def test_sensitivity_rule_is_the_highest_threshold_that_reaches_it(scores):
    y, s = scores
    t = stats.choose_threshold(y, s, "sens90")
    assert (s[y] >= t).mean() >= 0.9
    higher = np.unique(s[s > t])
    assert higher.size == 0 or (s[y] >= higher[0]).mean() < 0.9
    t = stats.choose_threshold(y, s, "spec90")
    assert (s[~y] < t).mean() >= 0.9
    lower = np.unique(s[s < t])
    assert lower.size == 0 or (s[~y] < lower[-1]).mean() < 0.9


def test_ece_brier_by_hand_and_sklearn(scores):
    conf = np.array([0.9, 0.9, 0.6, 0.6])
    correct = np.array([1, 1, 1, 0])
    # Two bins of two: |0.9 - 1| and |0.6 - 0.5|, each half the images.
    assert stats.expected_calibration_error(conf, correct, bins=2) == pytest.approx(0.1)
    y, s = scores
    p = 1 / (1 + np.exp(-s))
    assert stats.brier_score(y.astype(float), p) == pytest.approx(skm.brier_score_loss(y, p))
    onehot = np.eye(2)[y.astype(int)]
    assert stats.brier_score(onehot, np.column_stack([1 - p, p])) == pytest.approx(2 * skm.brier_score_loss(y, p))


def test_calibration_slope_and_intercept():
    rng = np.random.default_rng(2)
    lp = rng.normal(0, 2, 20000)
    y = rng.random(lp.size) < 1 / (1 + np.exp(-(0.5 + 0.5 * lp)))  # true slope 0.5, true shift 0.5
    p = 1 / (1 + np.exp(-lp))
    slope, intercept = stats.calibration_slope_intercept(y, p)
    sk = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(lp[:, None], y)
    assert slope == pytest.approx(sk.coef_[0, 0], abs=1e-4)
    assert slope == pytest.approx(0.5, abs=0.05)
    # Calibration-in-the-large: the offset model's score equation sum(y - sigmoid(a + lp)) = 0 holds.
    assert np.sum(y - 1 / (1 + np.exp(-(intercept + lp)))) == pytest.approx(0, abs=1e-6)
    perfect = rng.random(lp.size) < p
    s1, i1 = stats.calibration_slope_intercept(perfect, p)
    assert s1 == pytest.approx(1, abs=0.06) and i1 == pytest.approx(0, abs=0.06)


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (5000, 3))
    true_p = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum(1, keepdims=True)  # calibrated at T = 2
    labels = np.array([rng.choice(3, p=row) for row in true_p])
    overconfident = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    t = stats.fit_temperature(np.log(overconfident), labels)
    assert t == pytest.approx(2.0, rel=0.08)
    np.testing.assert_allclose(stats.apply_temperature(overconfident, 2.0), true_p, atol=1e-9)


def test_net_benefit_by_hand():
    y = np.array([1, 1, 0, 0, 0], bool)
    s = np.array([0.9, 0.4, 0.6, 0.1, 0.2])
    curve = stats.net_benefit(y, s, np.array([0.5]))
    # At pt 0.5 (odds 1): TP 1, FP 1 of 5 -> 1/5 - 1/5 = 0; treat all: 2/5 - 3/5 = -0.2.
    assert curve["model"] == [pytest.approx(0.0)] and curve["treat_all"] == [pytest.approx(-0.2)]


def test_bootstrap_auc_interval_covers_the_true_auc():
    """95% intervals from 1000 resamples contain the known population AUC about 95% of the time."""
    from meddiag.evaluation.metrics import roc_auc

    d = 1.0
    true_auc = sps.norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(4)
    trials, covered = 120, 0
    for trial in range(trials):
        y = np.r_[np.ones(60, bool), np.zeros(90, bool)]
        s = np.where(y, rng.normal(d, 1, y.size), rng.normal(0, 1, y.size))
        lo, hi = stats.bootstrap_ci(lambda i: {"auc": roc_auc(y[i], s[i])}, y.size, n_resamples=1000, seed=trial)["auc"]
        covered += lo <= true_auc <= hi
    assert 0.88 <= covered / trials <= 0.995


def test_patient_bootstrap_resamples_patients_not_images():
    """Ten copies of each patient's image: an image bootstrap believes it has 10x the evidence and
    gives a far narrower interval; resampling patients gives the honest width."""
    from meddiag.evaluation.metrics import roc_auc

    rng = np.random.default_rng(5)
    y1 = rng.integers(0, 2, 60).astype(bool)
    s1 = rng.normal(y1 * 1.0, 1)
    y, s = np.repeat(y1, 10), np.repeat(s1, 10)
    groups = np.repeat([f"p{i}" for i in range(60)], 10)
    auc = lambda i: {"auc": roc_auc(y[i], s[i])}  # noqa: E731
    lo_img, hi_img = stats.bootstrap_ci(auc, y.size, None, 1000, 0)["auc"]
    lo_pat, hi_pat = stats.bootstrap_ci(auc, y.size, groups, 1000, 0)["auc"]
    lo_one, hi_one = stats.bootstrap_ci(lambda i: {"auc": roc_auc(y1[i], s1[i])}, 60, None, 1000, 0)["auc"]
    assert (hi_pat - lo_pat) > 2 * (hi_img - lo_img)
    assert (hi_pat - lo_pat) == pytest.approx(hi_one - lo_one, rel=0.25)
    for idx in stats.bootstrap_indices(y.size, groups, 5, 0):
        assert len(idx) % 10 == 0 and all(np.unique(groups[idx], return_counts=True)[1] % 10 == 0)


def test_a_specificity_no_threshold_reaches_calls_no_case_positive():
    import numpy as np

    from meddiag.evaluation.stats import choose_threshold

    y, score = np.array([1, 0, 1, 0, 0]), np.array([0.9, 0.9, 0.5, 0.2, 0.1])  # a negative tied with the top score
    threshold = choose_threshold(y, score, "spec90")
    assert threshold > score.max() and not (score >= threshold).any()
