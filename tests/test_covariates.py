"""Patient data beside the images: reading and checking covariates, fusing them with every network,
and using them everywhere a model is used (train, evaluate and its report, predict, explain, serve, ONNX)."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_covariate_manifest, run_meddiag as cli, write_csv
from meddiag.data.covariates import CovariateSchema, PatientData, TabularSpec, parse_columns
from meddiag.data.sources import load_data
from meddiag.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_covariate_manifest(tmp_path_factory.mktemp("cov"), n=120)


def load(manifest: Path, columns: str = "age,sex,site", **spec: object):
    return load_data(str(manifest), image_size=24, progress=False,
                     covariates=TabularSpec(columns=parse_columns([columns]), **spec))  # type: ignore[arg-type]


def rewrite(manifest: Path, out: Path, change) -> Path:  # noqa: ANN001 - change(row index, row) edits a row
    rows = list(csv.DictReader(open(manifest, newline="")))
    for i, row in enumerate(rows):
        change(i, row)
        row["path"] = str(manifest.parent / row["path"])
    return write_csv(out, rows)


# ---------------------------------------------------------------- reading and checking

def test_types_are_inferred_and_missing_values_are_missing_not_levels(manifest):
    data = load(manifest)
    table = data.splits["train"].covariates
    assert table.numeric_names == ["age"] and table.categorical_names == ["sex", "site"]
    everything = {n: np.concatenate([s.covariates.missing_mask()[n] for s in data.splits.values()]) for n in ("age", "sex", "site")}
    rows = list(csv.DictReader(open(manifest)))
    assert everything["age"].sum() == sum(r["age"] in ("", "NA") for r in rows)
    assert everything["sex"].sum() == sum(r["sex"] == "unknown" for r in rows)
    schema = CovariateSchema.fit(table)
    assert {c.name: c.levels for c in schema.categorical} == {"sex": ["female", "male"], "site": ["north", "south"]}


def test_a_forced_type_overrides_the_inferred_one(manifest):
    table = load(manifest, "age:cat,sex").splits["train"].covariates
    assert table.categorical_names == ["age", "sex"] and table.numeric_names == []


def test_text_in_a_numeric_column_names_file_line_and_column(manifest, tmp_path):
    bad = rewrite(manifest, tmp_path / "bad.csv", lambda i, r: r.update(age="sixty") if i == 7 else None)
    with pytest.raises(DataError, match=r"bad\.csv, column age: not a number at line 9: 'sixty'"):
        load(bad)
    with pytest.raises(DataError, match="line 9"):  # forced numeric: the same, even for one bad value
        load(bad, "age:num")


def test_a_negative_age_and_an_infinite_value_are_refused_by_line(manifest, tmp_path):
    neg = rewrite(manifest, tmp_path / "neg.csv", lambda i, r: r.update(age="-4") if i == 3 else None)
    with pytest.raises(DataError, match=r"column age: an age must be between 0 and 130 years, not line 5: -4"):
        load(neg)
    inf = rewrite(manifest, tmp_path / "inf.csv", lambda i, r: r.update(age="inf") if i == 2 else None)
    with pytest.raises(DataError, match=r"line 4, column age: 'inf' is not a finite number"):
        load(inf)


def test_unknown_and_reserved_columns_and_identifiers_are_refused(manifest, tmp_path):
    with pytest.raises(ConfigError, match="covariate 'weight' is not a column of .*; its columns: age, sex, site"):
        load(manifest, "age,weight")
    with pytest.raises(ConfigError, match="'label' is a manifest column"):
        load(manifest, "label")
    ids = rewrite(manifest, tmp_path / "ids.csv", lambda i, r: r.update(site=f"room-{i}"))
    with pytest.raises(DataError, match="column site: 120 different values in 120 rows; that is an identifier"):
        load(ids)
    with pytest.raises(ConfigError, match="covariates are read from a CSV manifest"):
        load_data(str(manifest.parent / "img"), covariates=TabularSpec(columns=[("age", None)]))


def test_the_missing_tokens_are_configurable(manifest, tmp_path):
    coded = rewrite(manifest, tmp_path / "coded.csv", lambda i, r: r.update(age="-99") if r["age"] in ("", "NA") else None)
    with pytest.raises(DataError, match="an age must be between"):
        load(coded)
    data = load(coded, missing=("", "-99"))
    assert data.splits["train"].covariates.missing_mask()["age"].any()


def test_the_schema_is_fitted_on_the_training_split_only(manifest):
    data = load(manifest)
    train = data.splits["train"].covariates.numeric[:, 0]
    schema = CovariateSchema.fit(data.splits["train"].covariates)
    assert schema.numeric[0].median == pytest.approx(float(np.nanmedian(train)))
    everything = np.concatenate([s.covariates.numeric[:, 0] for s in data.splits.values()])
    assert schema.numeric[0].mean != pytest.approx(float(np.nanmean(everything)), abs=1e-9)


def test_encoding_missing_values_and_unseen_categories(manifest):
    schema = CovariateSchema.fit(load(manifest).splits["train"].covariates)
    table = schema.table_from_records([{"age": "70", "sex": "female", "site": "north"}, {}, {"sex": "other"}])
    with pytest.warns(UserWarning, match="new.csv: sex value\\(s\\) other never seen in training; treated as missing"):
        encoded = schema.encode(table, warn="new.csv")
    missing = schema.missing_row()
    assert np.array_equal(encoded[1], missing)  # nothing known reads exactly as the all-missing encoding
    assert np.array_equal(encoded[2], missing)  # an unseen category is missing
    assert encoded[0][1] == 0 and missing[1] == 1  # age's missing indicator
    assert schema.missing_names(table) == [[], ["age", "sex", "site"], ["age", "sex", "site"]]
    with pytest.raises(DataError, match="input, column age: not a number at line 1: 'old'"):
        schema.table_from_records([{"age": "old"}])


def wide_table(manifest: Path, path: Path, absent: float = 0.3, columns: int = 40, seed: int = 0) -> Path:
    rows = list(csv.DictReader(open(manifest)))
    rng = np.random.default_rng(seed)
    out = []
    for r in rows:
        if rng.random() < absent:
            continue
        values = rng.normal(size=columns)
        values[0] += 2.0 * (r["label"] == "disease")
        out.append({"patient_id": r["patient_id"], **{f"gene_{j:03d}": f"{v:.3f}" for j, v in enumerate(values)},
                    "note": "free text"})
    return write_csv(path, out)


def test_a_joined_table_is_one_block_and_absent_patients_have_it_missing(manifest, tmp_path):
    genomics = wide_table(manifest, tmp_path / "genomics.csv")
    data = load(manifest, "age", tabular=genomics, join="patient_id", tabular_columns=["gene_*"])
    table = data.splits["train"].covariates
    assert len(table.numeric_names) == 41 and "note" not in table.names
    assert {table.blocks[n] for n in table.numeric_names if n.startswith("gene_")} == {"genomics"}
    join = data.covariate_join
    assert join["images_matched"] + join["images_absent"] == 120 and 0.15 < join["images_absent"] / 120 < 0.45
    absent = np.concatenate([s.covariates.missing_mask()["gene_000"] for s in data.splits.values()])
    assert absent.sum() == join["images_absent"]
    schema = CovariateSchema.fit(table, join="patient_id", tabular_block="genomics")
    assert schema.manifest_columns() == ["age"] and set(schema.block_features()) == {"age", "genomics"}


def test_a_wide_table_of_a_thousand_columns_joins_and_encodes(manifest, tmp_path):
    genomics = wide_table(manifest, tmp_path / "wide.csv", columns=1000)
    data = load(manifest, "age", tabular=genomics, tabular_columns=["gene_*"])
    table = data.splits["train"].covariates
    assert table.numeric.shape[1] == 1001 and not table.categorical_names
    schema = CovariateSchema.fit(table, join="patient_id", tabular_block="wide")
    encoded = schema.encode(data.splits["test"].covariates)
    assert encoded.shape == (len(data.splits["test"]), 2002) and np.isfinite(encoded).all()
    absent = data.splits["test"].covariates.missing_mask()["gene_999"]
    assert np.array_equal(encoded[absent][:, 3::2], np.ones((absent.sum(), 1000)))  # every gene's missing indicator
    names = schema.missing_names(data.splits["test"].covariates)[int(np.flatnonzero(absent)[0])]
    assert "wide" in names and not any(n.startswith("gene_") for n in names)  # the table's block, named once


def test_bad_joined_tables_are_named(manifest, tmp_path):
    genomics = wide_table(manifest, tmp_path / "genomics.csv")
    rows = list(csv.DictReader(open(genomics)))
    write_csv(tmp_path / "dup.csv", rows + [rows[0]])
    with pytest.raises(DataError, match=r"dup\.csv, line \d+: patient_id '.*' already appears on line 2"):
        load(manifest, "age", tabular=tmp_path / "dup.csv")
    write_csv(tmp_path / "other.csv", [{**r, "patient_id": "X" + r["patient_id"]} for r in rows])
    with pytest.raises(DataError, match="no patient_id of .* appears in .*other.csv"):
        load(manifest, "age", tabular=tmp_path / "other.csv")
    with pytest.raises(ConfigError, match="--join lesion: .* has no such column"):
        load(manifest, "age", tabular=genomics, join="lesion")
    extra = [*rows, {"patient_id": "NOBODY", **{k: "0" for k in rows[0] if k != "patient_id"}}]
    write_csv(tmp_path / "extra.csv", extra)
    with pytest.warns(UserWarning, match="1 of the .* rows of extra.csv match no image"):
        load(manifest, "age", tabular=tmp_path / "extra.csv", tabular_columns=["gene_*"])


def test_the_shortcut_guard_catches_a_label_proxy(manifest, tmp_path):
    from meddiag.training.shortcuts import covariate_shortcuts

    leak = rewrite(manifest, tmp_path / "leak.csv", lambda i, r: r.update(
        confirmed="biopsy" if r["label"] == "disease" else ("follow-up" if i % 3 else "biopsy")))
    data = load(leak, "age,sex,confirmed")
    schema = CovariateSchema.fit(data.splits["train"].covariates)
    findings = covariate_shortcuts(data, schema)
    assert [f["covariate"] for f in findings] == ["confirmed"], findings
    assert "label proxy" in findings[0]["message"]
    perfect = rewrite(manifest, tmp_path / "perfect.csv", lambda i, r: r.update(code="A" if r["label"] == "disease" else "B"))
    data = load(perfect, "age,code")
    found = covariate_shortcuts(data, CovariateSchema.fit(data.splits["train"].covariates))
    assert found and found[0]["check"] == "auc" and found[0]["value"] >= 0.95


# ---------------------------------------------------------------- networks

@pytest.fixture(scope="module")
def small_schema(manifest: Path) -> CovariateSchema:
    return CovariateSchema.fit(load(manifest).splits["train"].covariates)


@pytest.mark.parametrize("fusion", ["late", "film"])
@pytest.mark.parametrize("model", ["seed_cnn", "resnet18", "densenet121", "efficientnet_b0"])
@pytest.mark.parametrize("dims", [2, 3])
def test_every_network_fuses_in_2d_and_3d(small_schema, model, dims, fusion):
    from meddiag.models.checkpoint import ModelCard

    schema = small_schema
    card = ModelCard(model_name=model, class_names=["a", "b", "c"], task="multiclass", image_size=24 if dims == 2 else 32,
                     in_channels=1, spatial_dims=dims, covariates=schema, fusion=fusion)
    net = card.build_model().eval()
    with torch.no_grad():  # FiLM starts as the identity: move it off so that covariates matter
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn((2, 1) + (card.image_size,) * dims)
    known = torch.from_numpy(schema.encode(schema.table_from_records([{"age": "80", "sex": "male", "site": "north"}] * 2)))
    with torch.no_grad():
        alone, missing, given = net(x), net(x, torch.from_numpy(schema.missing_row()).expand(2, -1)), net(x, known)
    assert alone.shape == (2, 3)
    assert torch.allclose(alone, missing)  # no covariates = the all-missing encoding
    assert not torch.allclose(alone, given)


def test_covariate_dropout_withholds_whole_blocks_as_missing(manifest, small_schema):
    from meddiag.models.fusion import withhold_at_random

    schema = small_schema
    data = load(manifest)
    c = torch.from_numpy(schema.encode(data.splits["train"].covariates))
    missing = torch.from_numpy(schema.missing_row())
    blocks = [torch.tensor(ix) for ix in schema.block_features().values()]
    assert torch.equal(withhold_at_random(c, missing, blocks, 0.0), c)
    torch.manual_seed(0)
    out = withhold_at_random(c, missing, blocks, 0.5)
    for index in blocks:  # each block is either the case's own values or all missing
        own = (out[:, index] == c[:, index]).all(1)
        gone = (out[:, index] == missing[index]).all(1)
        assert (own | gone).all()
        assert 0.5 < gone.float().mean() < 0.9  # p=0.5 alone, or as part of everything (p=0.5)


def test_the_tabular_model_needs_covariates(manifest):
    from meddiag.training.config import TrainConfig
    from meddiag.training.run import train

    with pytest.raises(ConfigError, match="the tabular model learns from patient data only"):
        train(TrainConfig(data=str(manifest), model="tabular", out="/nonexistent/never"))


# ---------------------------------------------------------------- a fused run, end to end

def test_training_records_the_schema_and_the_missing_data(fused_run):
    from meddiag.models.checkpoint import load_checkpoint

    _, card = load_checkpoint(fused_run / "checkpoints" / "best.ckpt")
    assert card.fusion == "late" and card.covariates.names == ["age", "sex", "site"]
    assert 0 < card.covariates.numeric[0].missing_rate < 0.25
    record = json.loads((fused_run / "data.json").read_text())["covariates"]
    age = record["columns"]["age"]
    assert age["type"] == "num" and set(age["missing_rate"]) == {"train", "val", "test"}
    rows = list(csv.DictReader(open(fused_run.parent / "manifest.csv")))
    missing_age = {r["path"].split("/")[-1] for r in rows if r["age"] in ("", "NA")}
    listed = {Path(p).name for split in age["missing_images"].values() for p in split}
    assert listed == missing_age
    assert record["shortcut_warnings"] == []


def test_the_report_says_whether_the_covariates_helped(fused_run):
    fusion = json.loads((fused_run / "fusion.json").read_text())
    models = fusion["models"]
    assert set(models) == {"fused", "image only (covariates withheld)", "covariates only (boosted trees)"}
    diff = fusion["differences"]["image only (covariates withheld)"]["auc"]
    assert diff["ci"][0] <= diff["difference"] <= diff["ci"][1]
    assert models["fused"]["auc"] > models["image only (covariates withheld)"]["auc"]  # age carries signal the image lacks
    assert [r["withheld"] for r in fusion["robustness"]] == [0.0, 0.25, 0.5, 1.0]
    assert fusion["robustness"][0]["auc"] == pytest.approx(models["fused"]["auc"])
    assert fusion["importance"][0]["covariate"] == "age"
    report = json.loads((fused_run / "report.json").read_text())
    assert report["fusion"]["models"] == models and "age (num)" in report["model"]["covariates"]
    page = (fused_run / "report.html").read_text()
    assert "id='fusion'" in page and "Robustness to missing covariates" in page and (fused_run / "plots" / "fusion.png").exists()


def test_predict_with_a_covariate_csv_and_without_one(fused_run, tmp_path):
    images = sorted((fused_run.parent / "img").glob("*.png"))[:4]
    write_csv(tmp_path / "new.csv", [
        {"path": str(images[0]), "age": "80", "sex": "male", "site": "north"},
        {"path": images[1].name, "age": "", "sex": "female", "site": "west"},  # found by file name; unseen site
        {"path": str(images[2]), "age": "old", "sex": "male", "site": "south"},  # a bad value fails this case only
        {"path": "elsewhere.png", "age": "40", "sex": "male", "site": "south"},
    ])
    out = cli("predict", str(fused_run), *map(str, images), "--covariates", str(tmp_path / "new.csv"), "--output", str(tmp_path / "p.csv"))
    assert out.returncode == 1, out.stderr
    assert f"{images[2]}: {tmp_path / 'new.csv'}, column age: not a number at line 4: 'old'" in out.stderr
    assert "site value(s) west never seen in training; treated as missing" in out.stderr
    assert "1 row(s) of" in out.stderr and "elsewhere.png" in out.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    assert set(rows) == {images[0].name, images[1].name, images[3].name}
    assert rows[images[0].name]["missing_covariates"] == ""
    assert rows[images[1].name]["missing_covariates"] == "age;site"
    assert rows[images[3].name]["missing_covariates"] == "age;sex;site"  # no row: all missing, still diagnosed
    plain = cli("predict", str(fused_run), str(images[0]))
    assert plain.returncode == 0 and "age;sex;site" in plain.stdout
    assert float(rows[images[0].name]["prob_disease"]) != pytest.approx(float(plain.stdout.splitlines()[1].split(",")[2]), abs=1e-6)


def test_explain_gives_covariate_attributions_that_add_up(fused_run, tmp_path):
    from meddiag.explain import explain_files
    from meddiag.models.checkpoint import load_checkpoint

    model, card = load_checkpoint(fused_run / "checkpoints" / "best.ckpt")
    image = sorted((fused_run.parent / "img").glob("*.png"))[0]
    patients = PatientData.single({"age": 85, "sex": "male", "site": "north"})
    results, failures = explain_files(model, card, [image], tmp_path, patients=patients)
    assert not failures and results[0].figure.exists()
    attributions = {a["covariate"]: a["attribution"] for a in results[0].attributions}
    assert set(attributions) == {"age", "sex", "site"}
    from meddiag.explain.saliency import probabilities
    from meddiag.models.inputs import read_inputs

    x = torch.tensor(read_inputs(image, card)[0].array[None])
    c = torch.from_numpy(card.covariates.encode(patients.table_for(card.covariates, image)))
    k = card.class_names.index(results[0].explained)
    gap = probabilities(model, x, card, c)[0, k] - probabilities(model, x, card)[0, k]
    assert sum(attributions.values()) == pytest.approx(gap, abs=0.02)  # integrated gradients' completeness
    out = cli("explain", str(fused_run), str(image), "--out", str(tmp_path / "cli"))
    assert out.returncode == 0 and "covariates: " in out.stdout


def test_serve_takes_covariates_as_form_fields_or_json(fused_run):
    from fastapi.testclient import TestClient

    from meddiag.serving.app import create_app
    from meddiag.serving.predictor import Predictor

    image = sorted((fused_run.parent / "img").glob("*.png"))[0]
    data = image.read_bytes()
    with TestClient(create_app(Predictor.from_run(fused_run), fused_run)) as client:
        card = client.get("/v1/model").json()["covariates"]
        assert [f["name"] for f in card["fields"]] == ["age", "sex", "site"]
        assert card["fields"][1] == {"name": "sex", "type": "category", "levels": ["female", "male"]}

        def post(**form: str) -> dict:
            response = client.post("/v1/predict", files=[("files", ("a.png", data, "image/png"))], data=form)
            return response

        plain = post().json()["results"][0]
        assert plain["missing_covariates"] == ["age", "sex", "site"]
        fields = post(age="85", sex="male").json()["results"][0]
        assert fields["missing_covariates"] == ["site"]
        as_json = post(covariates=json.dumps({"age": 85, "sex": "male"})).json()["results"][0]
        assert as_json["probabilities"] == pytest.approx(fields["probabilities"])
        assert as_json["probabilities"] != pytest.approx(plain["probabilities"])
        bad = post(age="old")
        assert bad.status_code == 400 and "column age: not a number" in bad.json()["reason"]
        assert post(covariates="{not json").status_code == 400
        unknown = post(covariates=json.dumps({"weight": 80}))
        assert unknown.status_code == 400 and "unknown covariate(s) weight" in unknown.json()["detail"]
        explained = client.post("/v1/predict?explain=gradcam", files=[("files", ("a.png", data, "image/png"))],
                                data={"age": "85"}).json()["results"][0]
        assert {a["covariate"] for a in explained["covariate_attributions"]} == {"age", "sex", "site"}


def test_onnx_export_has_two_inputs_and_matches_pytorch(fused_run, tmp_path):
    import onnxruntime as ort

    from meddiag.serving.predictor import Predictor

    out = cli("export", str(fused_run), "--out", str(tmp_path / "m.onnx"))
    assert out.returncode == 0, out.stderr
    names = [i.name for i in ort.InferenceSession(str(tmp_path / "m.onnx")).get_inputs()]
    assert names == ["image", "covariates"]
    images = sorted((fused_run.parent / "img").glob("*.png"))[:3]
    patients = PatientData.single({"age": 70, "sex": "female"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_rows, _ = Predictor.from_run(fused_run).predict(images, patients)
        onnx_rows, _ = Predictor.from_run(fused_run, backend="onnx").predict(images, patients)
    for a, b in zip(torch_rows, onnx_rows):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
        assert a.missing_covariates == ["site"]


def test_evaluate_compares_a_separately_trained_image_only_run(fused_run, tmp_path):
    from meddiag.training.config import TrainConfig
    from meddiag.workflow import train_and_evaluate

    image_only = TrainConfig.from_file(fused_run / "config.yaml").model_copy(update={
        "covariates": [], "out": str(tmp_path / "image-only"), "epochs": 3})
    train_and_evaluate(image_only, progress=False)
    out = cli("evaluate", str(fused_run), "--compare", str(tmp_path / "image-only"), "--out", str(tmp_path / "eval"),
              "--resamples", "200")
    assert out.returncode == 0, out.stderr
    fusion = json.loads((tmp_path / "eval" / "fusion.json").read_text())
    name = "image-only (seed_cnn, image only)"
    assert name in fusion["models"] and name in fusion["differences"]
    theirs = json.loads((tmp_path / "image-only" / "metrics.json").read_text())["auc"]
    assert fusion["models"][name]["auc"] == pytest.approx(theirs, abs=1e-4)  # the same test images, the same AUC
    import shutil

    shutil.copytree(tmp_path / "image-only", tmp_path / "elsewhere")
    lines = (tmp_path / "elsewhere" / "predictions.csv").read_text().splitlines()
    (tmp_path / "elsewhere" / "predictions.csv").write_text("\n".join(lines[:-1]) + "\n")  # one test image fewer
    wrong = cli("evaluate", str(fused_run), "--compare", str(tmp_path / "elsewhere"), "--out", str(tmp_path / "eval2"))
    assert wrong.returncode == 2 and "holds other images than this one's" in wrong.stderr
    unevaluated = cli("evaluate", str(fused_run), "--split", "val", "--compare", str(tmp_path / "image-only"),
                      "--out", str(tmp_path / "eval3"))
    assert unevaluated.returncode == 2 and "evaluate that run on its val split first" in unevaluated.stderr


def test_csv_files_that_are_not_text_are_named(manifest, tmp_path):
    (tmp_path / "latin1.csv").write_bytes("path,label\nbild\xe4.png,a\n".encode("latin-1"))
    (tmp_path / "nul.csv").write_bytes(b"path,label\nx\x00.png,a\n")
    (tmp_path / "empty.csv").write_text("")
    out = cli("train", str(tmp_path / "latin1.csv"), "--out", str(tmp_path / "run"))  # one command line: an error line, no traceback
    assert out.returncode == 2 and "is not UTF-8 text" in out.stderr and "Traceback" not in out.stderr
    for name, message in (("latin1.csv", "is not UTF-8 text"), ("nul.csv", "holds NUL bytes"), ("empty.csv", "is empty")):
        with pytest.raises(DataError, match=message):
            load_data(str(tmp_path / name))
        with pytest.raises(DataError, match=message):
            load(manifest, "age", tabular=tmp_path / name)
        with pytest.raises(DataError, match=message):
            PatientData.from_csv(tmp_path / name)
    with pytest.raises(DataError, match="needs a 'path' column"):
        PatientData.from_csv(write_csv(tmp_path / "nopath.csv", [{"image": "a.png", "age": "3"}]))
    short = tmp_path / "short.csv"
    short.write_text("patient_id,gene_a,gene_b\nP000,1,2\n\nP001,3\n")
    with pytest.raises(DataError, match=r"short\.csv, line 4: 2 fields, but the header has 3"):
        load(manifest, "age", tabular=short)


def test_an_ensemble_of_fused_models_takes_covariates_too(fused_run, tmp_path):
    from meddiag.workflow import make_ensemble

    make_ensemble([fused_run, fused_run], tmp_path / "ens")
    fusion = json.loads((tmp_path / "ens" / "fusion.json").read_text())
    single = json.loads((fused_run / "fusion.json").read_text())
    assert fusion["models"]["fused"]["auc"] == pytest.approx(single["models"]["fused"]["auc"], abs=1e-6)  # two equal members
    image = sorted((fused_run.parent / "img").glob("*.png"))[0]
    write_csv(tmp_path / "one.csv", [{"path": str(image), "age": "85", "sex": "male", "site": "north"}])
    out = cli("predict", str(tmp_path / "ens"), str(image), "--covariates", str(tmp_path / "one.csv"))
    alone = cli("predict", str(fused_run), str(image), "--covariates", str(tmp_path / "one.csv"))
    assert out.returncode == 0 and out.stdout.splitlines()[1].split(",")[2] == alone.stdout.splitlines()[1].split(",")[2]


def test_train_and_predict_with_a_joined_table_from_the_command_line(manifest, tmp_path):
    genomics = wide_table(manifest, tmp_path / "genomics.csv", columns=30)
    run = tmp_path / "run"
    out = cli("train", str(manifest), "--model", "tabular", "--covariates", "age", "--tabular", str(genomics),
              "--tabular-columns", "gene_*", "--epochs", "10", "--batch-size", "16", "--image-size", "24", "--out", str(run),
              "--no-progress")
    assert out.returncode == 0, out.stderr
    record = json.loads((run / "data.json").read_text())["covariates"]
    assert record["join"]["columns"] == 30 and record["columns"]["genomics"]["type"] == "table"
    assert sum(len(v) for v in record["columns"]["genomics"]["absent_images"].values()) == record["join"]["images_absent"]
    fusion = json.loads((run / "fusion.json").read_text())
    importance = {r["covariate"]: r["auc_lost"] for r in fusion["importance"]}
    assert set(importance) == {"age", "genomics"}
    assert fusion["models"]["covariates only (boosted trees)"]["auc"] > 0.8
    rows = list(csv.DictReader(open(manifest)))
    present = {r["patient_id"] for r in csv.DictReader(open(genomics))}
    inside = next(r for r in rows if r["patient_id"] in present)
    outside = next(r for r in rows if r["patient_id"] not in present)
    images = [str(manifest.parent / r["path"]) for r in (inside, outside)]
    write_csv(tmp_path / "new.csv", [{"path": p, "patient_id": r["patient_id"], "age": r["age"]} for p, r in zip(images, (inside, outside))])
    predicted = cli("predict", str(run), *images, "--covariates", str(tmp_path / "new.csv"), "--tabular", str(genomics))
    assert predicted.returncode == 0, predicted.stderr
    missing = [line.rsplit(",", 1)[1] for line in predicted.stdout.splitlines()[1:]]
    assert "genomics" not in missing[0] and "genomics" in missing[1]
    no_table = cli("predict", str(run), images[0], "--tabular", str(genomics))
    assert no_table.returncode == 2 and "--tabular needs --covariates" in no_table.stderr
