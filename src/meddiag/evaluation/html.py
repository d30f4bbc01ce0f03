"""``report.html``: one self-contained file (styles and figures inline, nothing fetched from a
network), readable offline and attachable to a study record."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.note{color:#555;font-size:.9em}
.flag{color:#b00020;font-weight:600}figure{display:inline-block;margin:.5em 1em .5em 0}img{max-width:520px;border:1px solid #eee}
.wide img{max-width:1050px}nav a{margin-right:1em}
.use{border:1px solid #e0b000;background:#fff8e0;padding:.5em .8em;margin:.8em 0}
table.cm{margin:0;font-size:.85em}table.cm td,table.cm th{padding:.1em .4em;border:1px solid #ddd}
"""

SECTIONS = [("model", "Model"), ("data", "Data flow"), ("discrimination", "Discrimination"),
            ("operating-points", "Operating points"), ("calibration", "Calibration"),
            ("decision-curve", "Clinical utility"), ("fusion", "Patient data"), ("subgroups", "Subgroups"), ("failures", "Failure analysis"),
            ("selective-prediction", "Knowing when not to answer"), ("explanations", "Are the heatmaps meaningful?")]


def num(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def with_ci(value: object, ci: object, digits: int = 3) -> str:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return num(value, digits)
    return f"{num(value, digits)} <span class='note'>({num(ci[0], digits)}–{num(ci[1], digits)})</span>"


def figure(path: Path, caption: str = "", wide: bool = False) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    cls = " class='wide'" if wide else ""
    return f"<figure{cls}><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'><figcaption class='note'>{html.escape(caption)}</figcaption></figure>"


def table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(report: dict, plots: dict[str, Path]) -> str:
    """The HTML page of a report dict (as ``report.json`` holds it) and its figure files."""
    generated = f"Generated {html.escape(report['generated'])} by meddiag {html.escape(report['meddiag_version'])}. " if report.get("generated") else ""
    parts = [f"<h1>meddiag evaluation report</h1><p class='note'>{html.escape(report['title'])}. {generated}</p>",
             f"<p class='use'><strong>Intended use.</strong> {html.escape(report.get('intended_use', ''))}</p>" if report.get("intended_use") else "",
             "<nav>" + "".join(f"<a href='#{k}'>{t}</a>" for k, t in SECTIONS) + "</nav>"]
    parts += [_model(report), _data(report, plots), _discrimination(report, plots), _operating_points(report),
              _calibration(report, plots), _decision(report, plots), _fusion(report, plots), _subgroups(report), _failures(report, plots),
              _selective(report, plots), _explanations(report, plots)]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>meddiag report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")


def drift_page(d: dict, plot: Path | None) -> str:
    """``drift.html``: a batch's shift against the model's reference, as ``drift.json`` holds it."""
    r = d["result"]
    verdict = "flag" if r["shift"] else "note"
    names = {"features": "Feature distribution (MMD², permutation)", "predicted_classes": "Predicted-class frequencies (permutation)",
             "flagged": "Share flagged as unfamiliar (Fisher, one-sided)"}
    rows = []
    for key, t in r["tests"].items():
        if key == "features":
            detail = f"{html.escape(t['space'])}; MMD² {t['statistic']:.4g}"
        elif key == "predicted_classes":
            detail = ", ".join(f"{html.escape(c)} {100 * t['reference_share'][c]:.1f}% → {100 * t['batch_share'][c]:.1f}%" for c in t["batch_share"])
        else:
            detail = f"{100 * t['reference_share']:.1f}% → {100 * t['batch_share']:.1f}% above the {html.escape(t['method'])} threshold"
        rows.append([names[key], detail, f"{t['p_value']:.3g}"])
    atypical = [[html.escape(a["path"]), num(a["score"], 4), "yes" if a["ood"] else "", html.escape(a["reason"])] for a in d["atypical"]]
    failures = "".join(f"<li>{html.escape(f['path'])}: {html.escape(f['reason'])}</li>" for f in d["failures"][:200])
    parts = [f"<h1>meddiag shift check</h1><p class='note'>Generated {html.escape(d['generated'])} by meddiag "
             f"{html.escape(d['meddiag_version'])}: model {html.escape(d['model'])} of {html.escape(d['run'])}; "
             f"{d['n_inputs']} input(s) from {html.escape(', '.join(d['data']))} against {r['reference_n']} validation images.</p>",
             f"<p class='{verdict}'><strong>{html.escape(d['sentence'])}</strong></p>",
             table(["test", "reference → this batch", "p-value"], rows),
             f"<p class='note'>Batch p-value: the smallest test's, multiplied by the number of tests (Bonferroni); a shift is "
             f"reported below {r['alpha']:g}. {r['permutations']} permutations; {r['tested']} of {r['n']} inputs tested.</p>",
             figure(plot, "OOD scores and predicted classes: reference and batch", wide=True) if plot else "",
             "<h2>Most atypical inputs</h2>" + (table(["file", "score", "flagged", "reason"], atypical) if atypical else "<p>None.</p>"),
             f"<h2>Files not read ({len(d['failures'])})</h2><ul>{failures}</ul>" if d["failures"] else ""]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>meddiag shift check</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")


def _section(key: str, body: str) -> str:
    title = dict(SECTIONS)[key]
    return f"<section id='{key}'><h2>{title}</h2>{body}</section>"


def _model(r: dict) -> str:
    m = r["model"]
    rows = [[html.escape(k), num(v)] for k, v in m.items()]
    return _section("model", table(["property", "value"], rows))


def _data(r: dict, plots: dict[str, Path]) -> str:
    d = r.get("data") or {}
    classes = d.get("class_names", [])
    rows = []
    for split, info in (d.get("splits") or {}).items():
        counts = info.get("per_class", {})
        rows.append([split, num(info.get("n_images")), *[num(counts.get(c)) for c in classes], html.escape(str(info.get("origin", "")))])
    body = table(["split", "images", *map(html.escape, classes), "origin"], rows) if rows else "<p>No data record.</p>"
    excluded = d.get("excluded") or []
    if excluded:
        body += f"<p>{len(excluded)} file(s) excluded:</p>" + table(["file", "reason"], [[html.escape(e["path"]), html.escape(e["reason"])] for e in excluded[:200]])
        if len(excluded) > 200:
            body += f"<p class='note'>… and {len(excluded) - 200} more (all in data.json).</p>"
    else:
        body += "<p>No file was excluded.</p>"
    body += figure(plots.get("training", Path("-")), "Training curves (loss, validation AUC and accuracy per epoch)", wide=True)
    body += f"<p class='note'>Evaluated on {r['n_test']} {html.escape(r.get('split', 'test'))} images; operating points chosen on {r['n_val']} validation images.</p>"
    return _section("data", body)


def _discrimination(r: dict, plots: dict[str, Path]) -> str:
    d = r["discrimination"]
    rows = [[html.escape(c), with_ci(v["auc"], v["auc_ci"]), num(v["average_precision"]), num(v["positives"]), num(v["n"])]
            for c, v in d["per_class"].items()]
    body = table(["class (one-vs-rest)", "AUC (95% CI)", "average precision", "positives", "images"], rows)
    if "macro_auc" in d:
        body += table(["average", "AUC (95% CI)"], [["macro", with_ci(d["macro_auc"], d["macro_auc_ci"])],
                                                   ["micro", with_ci(d["micro_auc"], d["micro_auc_ci"])]])
    body += (f"<p class='note'>95% percentile bootstrap intervals, {d['n_resamples']} resamples (seed {d['seed']}), "
             f"resampling {d['resampled']}.</p>")
    body += figure(plots.get("roc", Path("-")), "ROC curves") + figure(plots.get("pr", Path("-")), "Precision-recall curves")
    body += figure(plots.get("confusion", Path("-")), "Confusion matrix at the checkpoint's decision")
    return _section("discrimination", body)


def _operating_points(r: dict) -> str:
    body = ("<p class='note'>Thresholds are chosen on the validation split and reported on the test split. "
            "Sensitivity, specificity, PPV and NPV with Wilson 95% intervals; F1 with a bootstrap interval. A target "
            "<span class='flag'>missed</span> on test means its whole 95% interval lies below it.</p>")
    for cls, points in r["operating_points"].items():
        rows = []
        for name, p in points.items():
            if "error" in p:
                rows.append([html.escape(name), html.escape(p["error"])] + [""] * 7)
                continue
            missed = f"<br><span class='flag'>missed: {html.escape(p['target_missed'])}</span>" if p.get("target_missed") else ""
            rows.append([f"{html.escape(name)}<br><span class='note'>{html.escape(p['rule'])}</span>{missed}", num(p.get("threshold"), 4),
                         with_ci(p["sensitivity"], p["sensitivity_ci"]), with_ci(p["specificity"], p["specificity_ci"]),
                         with_ci(p["ppv"], p["ppv_ci"]), with_ci(p["npv"], p["npv_ci"]), with_ci(p["f1"], p["f1_ci"]),
                         _two_by_two(p)])
        body += f"<h3>{html.escape(cls)}</h3>" + table(
            ["operating point", "threshold", "sensitivity", "specificity", "PPV", "NPV", "F1", "2x2 table"], rows)
    return _section("operating-points", body)


def _two_by_two(p: dict) -> str:
    """The 2x2 table of one operating point, truth in rows, decision in columns."""
    return ("<table class='cm'><tr><th></th><th>called +</th><th>called −</th></tr>"
            f"<tr><th>truly +</th><td>TP {p['tp']}</td><td>FN {p['fn']}</td></tr>"
            f"<tr><th>truly −</th><td>FP {p['fp']}</td><td>TN {p['tn']}</td></tr></table>")


def _calibration(r: dict, plots: dict[str, Path]) -> str:
    c = r["calibration"]
    rows = []
    for name, key in (("model", "model"), ("before temperature scaling", "before_temperature")):
        if key in c:
            v = c[key]
            rows.append([name, num(v.get("ece")), num(v.get("brier")), num(v.get("slope")), num(v.get("intercept"))])
    body = table(["", "ECE", "Brier", "slope", "intercept"], rows)
    body += f"<p class='note'>Of {html.escape(c['model'].get('of', ''))}. ECE over 15 equal-mass bins; slope and intercept of a logistic recalibration (perfect: 1 and 0; slope &lt; 1: overconfident).</p>"
    if "temperature" in c:
        body += f"<p>Temperature scaling fitted on validation: T = {num(c['temperature'])}.</p>"
    slope = c["model"].get("slope")
    if "temperature" not in c and isinstance(slope, float) and math.isfinite(slope) and not 0.8 <= slope <= 1.25:
        body += (f"<p class='flag'>Calibration slope {slope:.2f}: the probabilities are "
                 f"{'over' if slope < 1 else 'under'}confident. <code>meddiag train --calibrate</code> fits temperature "
                 "scaling on validation and stores it in the checkpoint.</p>")
    per_class = c["model"].get("per_class")
    if per_class:
        body += table(["class", "ECE", "Brier", "slope", "intercept"],
                      [[html.escape(k), num(v["ece"]), num(v["brier"]), num(v["slope"]), num(v["intercept"])] for k, v in per_class.items()])
    body += figure(plots.get("reliability", Path("-")), "Reliability diagram")
    return _section("calibration", body)


def _decision(r: dict, plots: dict[str, Path]) -> str:
    if not r.get("decision_curve"):
        return _section("decision-curve", "<p>Decision curves are drawn for binary tasks.</p>")
    return _section("decision-curve", "<p class='note'>Net benefit = TP/N − FP/N × pt/(1 − pt) (Vickers &amp; Elkin 2006).</p>"
                    + figure(plots.get("decision", Path("-")), "Decision curve", wide=True))


def _fusion(r: dict, plots: dict[str, Path]) -> str:
    f = r.get("fusion")
    shortcuts = ((r.get("data") or {}).get("covariates") or {}).get("shortcut_warnings") or []
    if not f:
        return _section("fusion", "<p>The model sees the image only (<code>--covariates age,sex,...</code> adds patient data "
                                  "from manifest columns; <code>--tabular</code> a joined table).</p>")
    body = "".join(f"<p class='flag'>{html.escape(w['message'])}</p>" for w in shortcuts)
    diffs = f["differences"]
    rows = []
    for name, m in f["models"].items():
        d = diffs.get(name)
        cells = [html.escape(name), num(m["auc"]), num(m["balanced_acc"])]
        if d:
            cells += [_difference(d["auc"]), _difference(d["balanced_acc"])]
        else:
            cells += ["", ""]
        rows.append(cells)
    body += table(["model", "AUC", "balanced accuracy", "fused minus this: AUC (95% CI)", "balanced accuracy (95% CI)"], rows)
    body += (f"<p class='note'>The same {f['n']} test cases for every row. Image only: the fused model with every covariate "
             "withheld (as for a patient whose data is unknown). Covariates only: gradient-boosted trees on the training "
             f"split's covariates. Paired bootstrap, {f['n_resamples']} resamples of {html.escape(f['resampled'])}; "
             "<span class='flag'>bold red</span>: the interval excludes zero.</p>")
    body += table(["test covariates withheld", "AUC"], [[f"{100 * x['withheld']:.0f}%", num(x["auc"])] for x in f["robustness"]])
    body += figure(plots.get("fusion", Path("-")), "Robustness to missing covariates; importance of each covariate", wide=True)
    return _section("fusion", body)


def _difference(d: dict) -> str:
    text = with_ci(d["difference"], d["ci"])
    return f"<span class='flag'>{text}</span>" if d.get("excludes_zero") else text


def _subgroups(r: dict) -> str:
    groups = r.get("subgroups") or {}
    if not groups:
        return _section("subgroups", "<p>No subgroups asked for (<code>--subgroups sex,age_group,site</code> names manifest columns).</p>")
    body = ("<p class='note'>Each subgroup against the rest of the test set; a gap is <span class='flag'>flagged</span> when its "
            "95% interval excludes zero (bootstrap for AUC, Newcombe's score interval for proportions).</p>")
    for column, rows in groups.items():
        if "error" in rows:
            body += f"<h3>{html.escape(column)}</h3><p>{html.escape(rows['error'])}</p>"
            continue
        keys = [k for k in ("sensitivity", "specificity", "acc") if any(k in v for v in rows.values())]
        out = []
        for value, v in rows.items():
            cells = [html.escape(value), num(v["n"]), with_ci(v["auc"], v["auc_ci"]), with_ci(v["auc_gap_vs_rest"], v["auc_gap_ci"])]
            for k in keys:
                cells += [with_ci(v.get(k), v.get(f"{k}_ci")), with_ci(v.get(f"{k}_gap_vs_rest"), v.get(f"{k}_gap_ci"))]
            cells.append(f"<span class='flag'>{', '.join(v['flagged'])}</span>" if v["flagged"] else "")
            out.append(cells)
        header = ["value", "images", "AUC", "AUC gap"] + [h for k in keys for h in (k, f"{k} gap")] + ["flagged"]
        body += f"<h3>{html.escape(column)}</h3>" + table(header, out)
    return _section("subgroups", body)


def _failures(r: dict, plots: dict[str, Path]) -> str:
    f = r.get("failures") or {}
    body = figure(plots.get("failures", Path("-")), "The most confident mistakes", wide=True)
    for name, rows in f.items():
        body += f"<h3>{html.escape(name.replace('_', ' '))}</h3>" + table(
            ["image", "truth", "prediction", "probability"],
            [[html.escape(x["image"]), html.escape(x["label"]), html.escape(x["prediction"]), num(x["probability"])] for x in rows])
    return _section("failures", body or "<p>No mistakes to show.</p>")


def _explanations(r: dict, plots: dict[str, Path]) -> str:
    examples = figure(plots.get("examples", Path("-")), "Where the model looked on the test images it is surest show the "
                                                        "finding (Grad-CAM; made when the run was trained)", wide=True)
    s = r.get("explanation_sanity")
    if not s:
        return _section("explanations", examples + "<p>Not checked yet: <code>meddiag explain RUN --sanity</code> tests the "
                                        "heatmaps (model randomisation, deletion) and adds the result here.</p>")
    ra, de = s["randomisation"], s["deletion"]
    verdict = lambda ok: "passes" if ok else "<span class='flag'>fails</span>"  # noqa: E731
    rows = [["model randomisation (Adebayo et al. 2018)", f"Spearman {num(ra['spearman_fully_random'])} with the fully randomised model",
             html.escape(s["criteria"]["randomisation"]), verdict(ra["passes"])],
            ["deletion (Petsiuk et al. 2018)", f"area {num(de['deletion_auc'])} vs random maps {num(de['random_deletion_auc'])}",
             html.escape(s["criteria"]["deletion"]), verdict(de["passes"])]]
    body = examples + f"<p>{html.escape(s['method'])} maps of {s['n_images']} test images.</p>" + table(["check", "result", "criterion", ""], rows)
    body += table(["randomised down to", "Spearman"], [[html.escape(x["randomised_down_to"]), num(x["spearman"])] for x in ra["stages"]])
    return _section("explanations", body)


def _selective(r: dict, plots: dict[str, Path]) -> str:
    s = r.get("selective_prediction")
    if not s:
        return _section("selective-prediction", "<p>Not computed.</p>")
    at = s["error_at_coverage"]
    body = table(["coverage", "100%", "90%", "80%"], [["error among answered", num(at.get("100")), num(at.get("90")), num(at.get("80"))]])
    body += f"<p class='note'>Cases ranked by {html.escape(s['uncertainty'])}; the most uncertain are referred to a human first.</p>"
    rule = s.get("rule")
    if rule:
        body += (f"<p>The model's rule (abstain when uncertainty &gt; {num(rule['abstain_above'])}, chosen on validation) answers "
                 f"{num(rule['coverage'])} of these cases with error {num(rule['error_answered'])} (all cases: {num(rule['error_all'])}).</p>")
    else:
        body += "<p class='note'>No abstention rule stored: <code>train --coverage 0.9</code> chooses one on validation.</p>"
    body += _ood(r.get("ood"))
    return _section("selective-prediction", body + figure(plots.get("risk_coverage", Path("-")), "Risk-coverage curve"))


def _ood(o: dict | None) -> str:
    if not o:
        return ("<p class='note'>No out-of-distribution rule stored (a run made before there was one): "
                "<code>meddiag calibrate-ood RUN</code> adds it.</p>")
    a, k = o["all"], o["not_flagged"]
    return (f"<h3>Inputs unlike the training data</h3><p>The model flags an input when its {html.escape(o['method'])} score "
            f"exceeds {num(o['threshold'], 4)} (the threshold keeping {100 * o['keep']:.0f}% of the validation images; it "
            f"flagged {100 * o['val_flagged']:.1f}% there). Here it flagged <strong>{o['flagged']} of {o['n']}</strong> "
            f"({100 * o['flagged_share']:.1f}%).</p>"
            + table(["inputs", "n", "AUC", "accuracy"], [["all", num(a["n"]), num(a["auc"]), num(a["acc"])],
                                                        ["not flagged", num(k["n"]), num(k["auc"]), num(k["acc"])]]))
