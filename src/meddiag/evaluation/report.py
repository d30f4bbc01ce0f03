"""The evaluation report of a run: ``report.json`` and a self-contained ``report.html``.

Built from the per-image prediction files alone (test: ``predictions.csv``, validation:
``predictions_val.csv``), so it can be rebuilt without the model or the images:

- data flow (images per split and class, excluded files and why);
- discrimination: ROC and precision-recall curves, AUC per class with 95% bootstrap CIs
  (patients resampled when known), macro and micro averages;
- operating points chosen on validation (Youden, sensitivity >= 0.90/0.95, specificity >= 0.90)
  and the checkpoint's own, each on test with sensitivity, specificity, PPV, NPV (Wilson CIs),
  F1 (bootstrap CI) and the 2x2 table;
- calibration: ECE (15 equal-mass bins), Brier score, slope and intercept, reliability diagram,
  before and after temperature scaling when the model was calibrated;
- a decision curve (binary tasks); subgroups with gaps the CIs do not explain flagged;
- a gallery of the most confident false positives and false negatives.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import meddiag
from meddiag.evaluation import stats
from meddiag.evaluation.metrics import json_safe, predict_labels, roc_auc
from meddiag.evaluation.table import PredictionTable
from meddiag.models.uncertainty import normalised_entropy
from meddiag.runfolder import FUSION, OOD, PLOTS, PREDICTIONS, REPORT_HTML, REPORT_JSON, RunFolder, write_text_atomic

DEFAULT_RESAMPLES = 1000
RULES = tuple(stats.OPERATING_POINTS)

INTENDED_USE = ("For research use. A decision aid for qualified readers, not a diagnosis on its own: these figures "
                "describe one model on one data set, and do not establish its safety or effectiveness for clinical use.")


def focus_classes(task: str, class_names: Sequence[str]) -> list[int]:
    """Classes reported one-vs-rest: the positive class of a binary task, else every class."""
    return [1] if task == "binary" else list(range(len(class_names)))


def _known(truth: np.ndarray) -> np.ndarray:
    return np.isfinite(truth)


def discrimination(table: PredictionTable, task: str, class_names: list[str], n_resamples: int, seed: int) -> dict:
    """AUC per class (one-vs-rest), macro and micro averages, average precision; bootstrap 95% CIs."""
    truth, probs = table.truth_matrix(), table.probs
    classes = focus_classes(task, class_names)

    def aucs(idx: np.ndarray) -> dict[str, float]:
        t, p = truth[idx], probs[idx]
        out = {}
        for c in classes:
            m = _known(t[:, c])
            out[class_names[c]] = roc_auc(t[m, c], p[m, c])
        if task != "binary":
            out["macro"] = float(np.nanmean(list(out.values()))) if any(np.isfinite(list(out.values()))) else math.nan
            m = _known(t)
            out["micro"] = roc_auc(t[m], p[m])
        return out

    point = aucs(np.arange(len(table)))
    ci = stats.bootstrap_ci(aucs, len(table), table.groups, n_resamples, seed)
    per_class = {}
    for c in classes:
        name, m = class_names[c], _known(truth[:, c])
        per_class[name] = {
            "auc": point[name], "auc_ci": ci[name],
            "average_precision": stats.average_precision(truth[m, c], probs[m, c]),
            "positives": int(np.nansum(truth[:, c])), "n": int(m.sum()),
        }
    out = {"per_class": per_class, "n_resamples": n_resamples, "seed": seed,
           "resampled": "patients" if table.groups is not None else "images"}
    if task == "binary":
        out["auc"], out["auc_ci"] = point[class_names[1]], ci[class_names[1]]
    else:
        out.update(auc=point["macro"], auc_ci=ci["macro"], macro_auc=point["macro"], macro_auc_ci=ci["macro"],
                   micro_auc=point["micro"], micro_auc_ci=ci["micro"])
    return out


def operating_points(test: PredictionTable, val: PredictionTable | None, task: str, class_names: list[str],
                     threshold: float, n_resamples: int, seed: int) -> dict:
    """Per reported class: each rule's threshold chosen on validation, and the checkpoint's own
    decision, evaluated on test (2x2 table, Wilson CIs, F1 with a bootstrap CI)."""
    out: dict = {}
    t_truth, v_truth = test.truth_matrix(), val.truth_matrix() if val is not None else None
    own = predict_labels(test.probs, task, threshold)
    for c in focus_classes(task, class_names):
        m = _known(t_truth[:, c])
        y, score = t_truth[m, c].astype(bool), test.probs[m, c]
        groups = [g for g, k in zip(test.groups, m) if k] if test.groups is not None else None
        points: dict = {}
        if v_truth is not None:
            vm = _known(v_truth[:, c])
            vy, vs = v_truth[vm, c].astype(bool), val.probs[vm, c]  # type: ignore[union-attr]
            for rule in RULES:
                try:
                    t = stats.choose_threshold(vy, vs, rule)
                except ValueError as exc:
                    points[rule] = {"error": str(exc)}
                    continue
                points[rule] = _point(y, score >= t, groups, n_resamples, seed) | {
                    "threshold": t, "chosen_on": "val", "rule": stats.OPERATING_POINTS[rule]}
                points[rule]["target_missed"] = target_missed(rule, points[rule])
        if task == "multiclass":
            decided = (own == c)[m]
            rule_text = "the checkpoint's decision: the most probable class"
        else:
            decided = (own[:, c] if own.ndim == 2 else own).astype(bool)[m]
            rule_text = f"the checkpoint's threshold {threshold:g}"
        points["checkpoint"] = _point(y, decided, groups, n_resamples, seed) | {
            "threshold": threshold if task != "multiclass" else None, "rule": rule_text}
        out[class_names[c]] = points
    return out


def target_missed(rule: str, point: dict) -> str | None:
    """For a sensNN / specNN rule, why its target was missed on test beyond chance (the whole 95%
    interval below the target), else None. A threshold chosen on validation can miss on test."""
    kind, target = rule[:4], rule[4:]
    if kind not in ("sens", "spec") or not target.isdigit():
        return None
    name = "sensitivity" if kind == "sens" else "specificity"
    value, ci = point.get(name), point.get(f"{name}_ci")
    goal = int(target) / 100
    if ci is None or value is None or not ci[1] < goal:
        return None
    return f"{name} {value:.3f} on test (95% CI {ci[0]:.3f}-{ci[1]:.3f}) misses the target {goal:.2f} chosen on validation"


def _point(y: np.ndarray, decided: np.ndarray, groups: list[str] | None, n_resamples: int, seed: int) -> dict:
    table = stats.binary_table(y, decided.astype(float), 0.5)
    table.pop("threshold")
    table["f1_ci"] = stats.f1_bootstrap_ci(y, decided.astype(float), 0.5, groups, n_resamples, seed)
    return table


def calibration(table: PredictionTable, task: str, class_names: list[str], bins: int = 15) -> dict:
    """ECE, Brier score, calibration slope and intercept, and the reliability diagram's bins.
    Binary: the positive class's probability. Multi-class: the top-label confidence for ECE and
    the reliability diagram, the multi-class Brier score, slope and intercept per class."""
    truth, probs = table.truth_matrix(), table.probs
    if task == "binary":
        y, p = truth[:, 1], probs[:, 1]
        slope, intercept = stats.calibration_slope_intercept(y, p)
        return {"ece": stats.expected_calibration_error(p, y, bins), "brier": stats.brier_score(y, p),
                "slope": slope, "intercept": intercept, "bins": stats.reliability_bins(p, y, bins),
                "of": f"P({class_names[1]})"}
    per_class = {}
    for c, name in enumerate(class_names):
        m = _known(truth[:, c])
        slope, intercept = stats.calibration_slope_intercept(truth[m, c], probs[m, c])
        per_class[name] = {"slope": slope, "intercept": intercept,
                           "ece": stats.expected_calibration_error(probs[m, c], truth[m, c], bins),
                           "brier": stats.brier_score(truth[m, c], probs[m, c])}
    if task == "multilabel":
        return {"per_class": per_class, "ece": float(np.mean([v["ece"] for v in per_class.values()])),
                "brier": float(np.mean([v["brier"] for v in per_class.values()])), "of": "each label (mean)"}
    top = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == table.labels).astype(float)
    return {"ece": stats.expected_calibration_error(top, correct, bins), "brier": stats.brier_score(truth, probs),
            "bins": stats.reliability_bins(top, correct, bins), "per_class": per_class, "of": "top-label confidence"}


def decision_curve(table: PredictionTable, task: str) -> dict | None:
    if task != "binary":
        return None
    return stats.net_benefit(table.truth_matrix()[:, 1].astype(bool), table.probs[:, 1], np.round(np.arange(0.01, 1.0, 0.01), 2))


def newcombe_difference(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float, float]:
    """Difference of two independent proportions k1/n1 - k2/n2 with Newcombe's hybrid score 95%
    interval (built from the two Wilson intervals); NaNs when either is empty."""
    if n1 == 0 or n2 == 0:
        return math.nan, math.nan, math.nan
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = stats.wilson_interval(k1, n1)
    l2, u2 = stats.wilson_interval(k2, n2)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def subgroup_analysis(table: PredictionTable, task: str, class_names: list[str], threshold: float,
                      columns: Sequence[str], n_resamples: int, seed: int) -> dict:
    """Each subgroup's AUC (bootstrap CI), sensitivity and specificity (binary) or accuracy (Wilson
    CIs), ECE; and its gap to the rest of the test set, flagged when the gap's 95% interval
    excludes zero (bootstrap for AUC, Newcombe for proportions)."""
    out: dict = {}
    decided = predict_labels(table.probs, task, threshold)
    truth = table.truth_matrix()
    c = 1 if task == "binary" else None
    for column in columns:
        if column not in table.meta:
            out[column] = {"error": f"no column '{column}' in the predictions (the manifest's columns: "
                                    f"{', '.join(table.meta) or 'none'})"}
            continue
        values = np.asarray(table.meta[column])
        rows: dict = {}
        for value in sorted(set(values.tolist())):
            inside = values == value
            rows[value or "(empty)"] = _subgroup_row(table, truth, decided, inside, task, c, n_resamples, seed)
        out[column] = rows
    return out


def _subgroup_row(table: PredictionTable, truth: np.ndarray, decided: np.ndarray, inside: np.ndarray, task: str,
                  c: int | None, n_resamples: int, seed: int) -> dict:
    def auc_of(idx: np.ndarray) -> float:
        if c is not None:
            return roc_auc(truth[idx, c], table.probs[idx, c])
        values = []
        for k in range(truth.shape[1]):
            m = _known(truth[idx, k])
            values.append(roc_auc(truth[idx, k][m], table.probs[idx, k][m]))
        return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan

    sub, rest = np.flatnonzero(inside), np.flatnonzero(~inside)

    def both(idx: np.ndarray) -> dict[str, float]:
        s, r = idx[inside[idx]], idx[~inside[idx]]
        a, b = auc_of(s), auc_of(r)
        return {"auc": a, "gap": a - b}

    ci = stats.bootstrap_ci(both, len(table), table.groups, n_resamples, seed)
    row: dict = {"n": int(sub.size), "auc": auc_of(sub), "auc_ci": ci["auc"],
                 "auc_gap_vs_rest": auc_of(sub) - auc_of(rest) if rest.size else math.nan, "auc_gap_ci": ci["gap"]}
    flags = []
    if rest.size and all(np.isfinite(ci["gap"])) and (ci["gap"][0] > 0 or ci["gap"][1] < 0):
        flags.append("auc")
    if c is not None:
        y, d = truth[:, c].astype(bool), decided.astype(bool)
        row["positives"] = int(y[sub].sum())
        for name, mask in (("sensitivity", y), ("specificity", ~y)):
            hit = d if name == "sensitivity" else ~d
            k1, n1 = int((hit & mask)[sub].sum()), int(mask[sub].sum())
            k2, n2 = int((hit & mask)[rest].sum()), int(mask[rest].sum())
            row[name] = k1 / n1 if n1 else math.nan
            row[f"{name}_ci"] = stats.wilson_interval(k1, n1)
            gap, lo, hi = newcombe_difference(k1, n1, k2, n2)
            row[f"{name}_gap_vs_rest"], row[f"{name}_gap_ci"] = gap, (lo, hi)
            if np.isfinite(lo) and (lo > 0 or hi < 0):
                flags.append(name)
        p = table.probs[sub, c]
        row["ece"] = stats.expected_calibration_error(p, truth[sub, c]) if sub.size else math.nan
    elif task == "multiclass":
        right = decided == table.labels
        k1, n1, k2, n2 = int(right[sub].sum()), int(sub.size), int(right[rest].sum()), int(rest.size)
        row["acc"], row["acc_ci"] = (k1 / n1 if n1 else math.nan), stats.wilson_interval(k1, n1)
        gap, lo, hi = newcombe_difference(k1, n1, k2, n2)
        row["acc_gap_vs_rest"], row["acc_gap_ci"] = gap, (lo, hi)
        if np.isfinite(lo) and (lo > 0 or hi < 0):
            flags.append("acc")
    row["flagged"] = flags
    return row


def failure_cases(table: PredictionTable, task: str, class_names: list[str], threshold: float, k: int = 8) -> dict:
    """The most confident mistakes: false positives (highest probability among negatives called
    positive) and false negatives (lowest among positives missed); multi-class: the wrong calls
    made with the highest confidence."""
    if task == "multilabel":
        return {}
    decided = predict_labels(table.probs, task, threshold)
    wrong = np.flatnonzero(decided != table.labels)

    def row(i: int) -> dict:
        return {"index": int(i), "image": table.images[i], "label": class_names[int(table.labels[i])],
                "prediction": class_names[int(decided[i])], "probability": float(table.probs[i, int(decided[i])])}

    if task == "binary":
        fp = [i for i in wrong if decided[i] == 1]
        fn = [i for i in wrong if decided[i] == 0]
        fp.sort(key=lambda i: -table.probs[i, 1])
        fn.sort(key=lambda i: table.probs[i, 1])
        return {"false_positives": [row(i) for i in fp[:k]], "false_negatives": [row(i) for i in fn[:k]]}
    ranked = sorted(wrong, key=lambda i: -table.probs[i, int(decided[i])])
    return {"confident_errors": [row(i) for i in ranked[: 2 * k]]}


def selective_prediction(table: PredictionTable, task: str, threshold: float, abstain_threshold: float | None) -> dict:
    """Risk-coverage: the error among the cases answered when the most uncertain (normalised
    predictive entropy) are referred, at every coverage and at 100/90/80%; and what the model's own
    abstention rule (threshold chosen on validation) does on these cases."""
    u = normalised_entropy(table.probs, task)
    decided = predict_labels(table.probs, task, threshold)
    if task == "multilabel":
        truth = table.truth_matrix()
        known = np.isfinite(truth)
        errors = np.array([(decided[i][known[i]] != truth[i][known[i]]).mean() if known[i].any() else 0.0 for i in range(len(u))])
    else:
        errors = (decided != table.labels).astype(float)
    curve = stats.risk_coverage(errors, u)
    step = max(1, len(u) // 200)
    out = {"error_at_coverage": curve["error_at"], "curve": {"coverage": curve["coverage"][::step], "risk": curve["risk"][::step]},
           "uncertainty": "normalised predictive entropy"}
    if abstain_threshold is not None:
        answered = u <= abstain_threshold
        out["rule"] = {"abstain_above": abstain_threshold, "coverage": float(answered.mean()),
                       "error_answered": float(errors[answered].mean()) if answered.any() else math.nan,
                       "error_all": float(errors.mean())}
    return out


def compute_report(test: PredictionTable, val: PredictionTable | None, *, task: str, class_names: list[str],
                   threshold: float = 0.5, temperature: float = 1.0, subgroups: Sequence[str] = (),
                   n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, abstain_threshold: float | None = None) -> dict:
    """Every section of the report that is computed from predictions (see the module docstring)."""
    report: dict = {
        "discrimination": discrimination(test, task, class_names, n_resamples, seed),
        "operating_points": operating_points(test, val, task, class_names, threshold, n_resamples, seed),
        "calibration": {"model": calibration(test, task, class_names)},
        "decision_curve": decision_curve(test, task),
        "subgroups": subgroup_analysis(test, task, class_names, threshold, subgroups, n_resamples, seed) if subgroups else {},
        "failures": failure_cases(test, task, class_names, threshold),
        "selective_prediction": selective_prediction(test, task, threshold, abstain_threshold),
        "n_test": len(test), "n_val": len(val) if val is not None else 0,
    }
    if temperature != 1.0:
        before = PredictionTable(test.images, test.labels,
                                 stats.apply_temperature(test.probs, 1 / temperature, task == "multilabel"), test.groups, test.meta)
        report["calibration"] = {"model": report["calibration"]["model"], "before_temperature": calibration(before, task, class_names),
                                 "temperature": temperature}
    return report


def write_report(out_dir: Path, run_dir: Path, card, *, split: str = "test", subgroups: Sequence[str] = (),  # noqa: ANN001
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """Compute the report from ``out_dir/predictions.csv`` and ``run_dir/predictions_val.csv``,
    draw its figures into ``out_dir/plots`` and write ``report.json`` and ``report.html``."""
    from meddiag.evaluation import html, plots

    out_dir, run_dir = Path(out_dir), Path(run_dir)
    folder = RunFolder(run_dir)
    test = PredictionTable.read(out_dir / PREDICTIONS, card.class_names, card.task)
    val_file = folder.val_predictions
    val = PredictionTable.read(val_file, card.class_names, card.task) if val_file.exists() else None
    report = compute_report(test, val, task=card.task, class_names=card.class_names, threshold=card.threshold,
                            temperature=card.temperature, subgroups=subgroups, n_resamples=n_resamples, seed=seed,
                            abstain_threshold=card.abstain_threshold)
    data_file = folder.data_record
    report = {
        "title": f"{card.model_name} on {card.data_name or 'its data'}: {split} split of {_source_name(out_dir, run_dir)}",
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "meddiag_version": meddiag.__version__,
        "intended_use": INTENDED_USE,
        "split": split,
        "model": {"model": card.model_name, "task": card.task, "classes": " | ".join(f"'{c}'" for c in card.class_names),
                  **({"positive class (the finding)": card.class_names[1]} if card.task == "binary" else {}),
                  "input": f"{card.image_size}px, {card.spatial_dims}D, {card.in_channels} channel(s)",
                  "decision threshold": card.threshold, "operating point": card.operating_point or "fixed threshold",
                  "temperature": card.temperature, "trained on": card.data_name, "meddiag": card.meddiag_version},
        "data": json.loads(data_file.read_text()) if data_file.exists() else None,
        **report,
    }
    ood_file = out_dir / OOD  # written by evaluate for a model with an OOD rule
    report["ood"] = json.loads(ood_file.read_text()) if ood_file.exists() else None
    fusion_file = out_dir / FUSION  # written by evaluate for a model that takes covariates
    report["fusion"] = json.loads(fusion_file.read_text()) if fusion_file.exists() else None
    if card.covariates is not None:
        report["model"]["covariates"] = ", ".join(f"{n} ({k})" for n, k in card.covariates.kinds().items())[:2000]
        report["model"]["fusion"] = card.fusion
    sanity_file = folder.sanity  # written by `meddiag explain --sanity`
    report["explanation_sanity"] = json.loads(sanity_file.read_text()) if sanity_file.exists() else None
    figures = out_dir / PLOTS
    truth = test.truth_matrix()
    classes = focus_classes(card.task, card.class_names)
    found = {"training": folder.training_curves, "examples": folder.example_heatmaps, "roc": figures / "roc.png", "confusion": figures / "confusion_matrix.png", "failures": figures / "failures.png",
             "pr": plots.plot_precision_recall(truth, test.probs, classes, card.class_names, figures / "precision_recall.png")}
    cal = report["calibration"]
    curves = {name: cal[key]["bins"] for name, key in (("model", "model"), ("before temperature scaling", "before_temperature"))
              if key in cal and "bins" in cal[key]}
    if curves:
        found["reliability"] = plots.plot_reliability(curves, figures / "reliability.png", cal["model"].get("of", ""))
    if report["decision_curve"]:
        found["decision"] = plots.plot_decision_curve(report["decision_curve"], figures / "decision_curve.png")
    found["risk_coverage"] = plots.plot_risk_coverage(report["selective_prediction"], figures / "risk_coverage.png")
    if report["fusion"]:
        found["fusion"] = plots.plot_fusion(report["fusion"], figures / "fusion.png")
    report = json_safe(report)
    write_text_atomic(out_dir / REPORT_JSON, json.dumps(report, indent=2))
    write_text_atomic(out_dir / REPORT_HTML, html.render(report, found))
    return report


def _source_name(out_dir: Path, run_dir: Path) -> str:
    return "its own data" if out_dir == run_dir else out_dir.name
