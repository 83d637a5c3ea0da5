"""`run_sweep` and `netshrink sweep` on a tiny model and synthetic data: cells and files,
result columns, resume, configuration checks, failed cells, the optional plot, the HTML
report, and CLI validation before any work."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import sys

import pytest
import torch
from torch import nn

import netshrink
from netshrink import SweepConfigError, api, cli, run_sweep
from netshrink.sweep import COLUMNS, PLOT_HINT

OPTS = {"compress_kwargs": {"min_weights": 64}, "progress": False}


@pytest.fixture
def counted(monkeypatch):
    """Counts calls of netshrink.api.compress (what run_sweep calls per cell)."""
    calls: list[tuple[str, str]] = []
    real = api.compress

    def compress(model, method, target, *args, **kwargs):
        calls.append((method, target))
        return real(model, method, target, *args, **kwargs)

    monkeypatch.setattr(api, "compress", compress)
    return calls


def test_cells_files_columns_and_bytes(small_net, toy_loader, tmp_path):
    res = run_sweep(small_net, ["kmeans", "alds"], ["x4", "x1000"], train_data=toy_loader,
                    eval_data=toy_loader, out_dir=tmp_path, **OPTS)
    assert res.metric == "accuracy" and len(res.rows) == 4
    assert len(list((tmp_path / "cells").glob("*.json"))) == 5  # 4 cells + the baseline
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == COLUMNS and len(table) == 4
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["kmeans", "kmeans", "alds", "alds"]
    assert data["baseline"]["file_bytes"] == netshrink.model_bits(small_net) / 8
    for row in res.rows:
        if row["target"] == "x1000":  # infeasible: recorded, the sweep went on
            assert row["status"] == "failed" and "InfeasibleTargetError" in row["error"]
            continue
        assert row["status"] == "ok" and row["error"] is None
        assert os.stat(row["path"]).st_size == row["file_bytes"]
        assert row["ratio"] == pytest.approx(data["baseline"]["file_bytes"] / row["file_bytes"])
        again = netshrink.load(row["path"], small_net)
        assert netshrink.evaluate(again, toy_loader) == row["score"]
    ok = [r for r in res.rows if r["status"] == "ok"]
    assert res.frontier() and all(r in ok for r in res.frontier())
    assert "failed" in res.table() and "InfeasibleTargetError" in res.table()


def test_resume_skips_finished_cells(small_net, toy_loader, tmp_path, counted, monkeypatch):
    counting = api.compress  # the `counted` fixture's wrapper

    def killed_in_second_cell(*args, **kwargs):
        if len(counted) == 1:
            counted.append(args[1:3])
            raise KeyboardInterrupt  # the sweep is killed during its second cell
        return counting(*args, **kwargs)

    targets = ["x4", "x6", "3bit"]
    monkeypatch.setattr(api, "compress", killed_in_second_cell)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(small_net, ["kmeans"], targets, train_data=toy_loader,
                  eval_data=toy_loader, out_dir=tmp_path, **OPTS)
    assert len(list((tmp_path / "cells").glob("kmeans-*.json"))) == 1
    monkeypatch.setattr(api, "compress", counting)
    counted.clear()
    res = run_sweep(small_net, ["kmeans"], targets, train_data=toy_loader,
                    eval_data=toy_loader, out_dir=tmp_path, **OPTS)
    assert counted == [("kmeans", "x6"), ("kmeans", "3bit")]
    assert [r["status"] for r in res.rows] == ["ok", "ok", "ok"]
    counted.clear()
    again = run_sweep(small_net, ["kmeans"], targets, train_data=toy_loader,
                      eval_data=toy_loader, out_dir=tmp_path, **OPTS)
    assert counted == [] and again.rows == res.rows


def test_other_config_refused_force_accepted(small_net, toy_loader, tmp_path, counted):
    run_sweep(small_net, ["kmeans"], ["x4"], train_data=toy_loader, eval_data=toy_loader,
              out_dir=tmp_path, **OPTS)
    other = {"kmeans": {"per_channel": False}}
    with pytest.raises(SweepConfigError, match="methods.kmeans"):
        run_sweep(small_net, ["kmeans"], ["x4"], train_data=toy_loader,
                  eval_data=toy_loader, out_dir=tmp_path, options=other, **OPTS)
    with torch.no_grad():
        small_net.fc.weight.add_(1.0)  # another model
    with pytest.raises(SweepConfigError, match="model"):
        run_sweep(small_net, ["kmeans"], ["x4"], train_data=toy_loader,
                  eval_data=toy_loader, out_dir=tmp_path, **OPTS)
    assert len(counted) == 1
    res = run_sweep(small_net, ["kmeans"], ["x4"], train_data=toy_loader, eval_data=toy_loader,
                    out_dir=tmp_path, options=other, force=True, **OPTS)
    assert len(counted) == 2 and res.rows[0]["status"] == "ok"
    assert json.loads((tmp_path / "sweep.json").read_text())["methods"] == other


def test_agreement_without_labels(small_net, toy_loader, tmp_path):
    unlabelled = torch.utils.data.DataLoader(toy_loader.dataset.tensors[0], batch_size=64)
    res = run_sweep(small_net, ["kmeans"], ["x4"], train_data=toy_loader,
                    eval_data=unlabelled, out_dir=tmp_path, **OPTS)
    row = res.rows[0]
    assert res.metric == "agreement" and res.baseline["score"] == 1.0
    again = netshrink.load(row["path"], small_net)
    assert row["score"] == netshrink.agreement(again, small_net, unlabelled)
    assert row["kl"] is not None and row["kl"] >= 0


def test_plot_and_self_contained_html(small_net, toy_loader, tmp_path):
    pytest.importorskip("matplotlib")
    res = run_sweep(small_net, ["kmeans", "alds"], ["x4", "x6"], train_data=toy_loader,
                    eval_data=toy_loader, out_dir=tmp_path, **OPTS)
    assert (tmp_path / "pareto.png").stat().st_size > 0 and "png" in res.files
    page = (tmp_path / "report.html").read_text()
    assert "<svg" in page and "<table" in page and "alds" in page
    # nothing loaded from elsewhere: no src= attribute, no stylesheet link, no http(s) href
    assert not re.search(r"\ssrc=|<link|href=\"https?:|url\((?!#)", page)


def test_missing_matplotlib(small_net, toy_loader, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    run_sweep(small_net, ["kmeans"], ["x4"], train_data=toy_loader, eval_data=toy_loader,
              out_dir=tmp_path, **OPTS)
    assert "pip install 'netshrink[plot]'" in capsys.readouterr().out
    assert not (tmp_path / "pareto.png").exists()
    for name in ("results.csv", "results.json", "report.html"):
        assert (tmp_path / name).is_file()
    assert html.escape(PLOT_HINT) in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize("bad", [
    ["--methods", "foo"], ["--targets", "x4,huge"], ["--targets", ","],
    ["--option", "nonsense=1"], ["--option", "smh.bits=3", "--methods", "kmeans"],
    ["--option", "kmeans.bits=99"], ["--epochs", "-1"]])
def test_cli_errors_before_work(bad, monkeypatch, capsys):
    def no_work(args):
        raise AssertionError("model or data loaded before validation")

    monkeypatch.setattr(cli, "_resolve", no_work)
    assert cli.main(["sweep", "--model", "resnet20", *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("netshrink: error:") and "\n" not in err


def test_cli_sweep(small_net, toy_loader, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_resolve",
                        lambda args: (small_net, toy_loader, toy_loader, "accuracy"))
    argv = ["sweep", "--model", "tiny", "--methods", "kmeans", "--targets", "x4,x1000",
            "--min-weights", "64", "--option", "per_channel=false", "--out-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "kmeans" in out and "failed" in out and str(tmp_path / "results.json") in out
    config = json.loads((tmp_path / "sweep.json").read_text())
    assert config["methods"] == {"kmeans": {"per_channel": False}}
    argv[argv.index("per_channel=false")] = "per_channel=true"
    assert cli.main(argv) == 2 and "--force" in capsys.readouterr().err
    assert cli.main([*argv, "--force"]) == 0


def test_cli_sweep_zoo_baseline(tmp_path, monkeypatch, capsys):
    """The real `_resolve`: a zoo baseline (a tiny one, cached in a temporary folder) on
    Fashion-MNIST subsets."""
    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    assert cli.main(["train-baseline", "resnet20", "--epochs", "1", "--subset-train", "128",
                     "--subset-test", "64"]) == 0
    out_dir = tmp_path / "sweep"
    assert cli.main(["sweep", "--model", "resnet20", "--methods", "kmeans", "--targets", "x8",
                     "--subset-train", "64", "--subset-test", "64",
                     "--out-dir", str(out_dir)]) == 0
    assert "kmeans" in capsys.readouterr().out
    data = json.loads((out_dir / "results.json").read_text())
    assert data["metric"] == "accuracy" and data["rows"][0]["status"] == "ok"
    assert data["config"]["describe"]["model"] == "resnet20"


def test_sweep_of_a_language_model_measures_perplexity(tmp_path):
    """Text data: every cell's perplexity, lower is better, the frontier by lowest."""
    torch.manual_seed(0)
    lm = nn.Sequential(nn.Embedding(32, 64), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    tokens = torch.randint(0, 32, (16, 12))
    loader = torch.utils.data.DataLoader(tokens, batch_size=8)
    result = run_sweep(lm, ["kmeans"], ["8bit", "2bit"], train_data=loader, eval_data=loader,
                       out_dir=tmp_path, metric="perplexity",
                       compress_kwargs={"min_weights": 0}, progress=False)
    assert result.metric == "perplexity" and result.baseline["kl"] is None
    scores = {r["target"]: r["score"] for r in result.rows}
    assert all(s > 1 for s in scores.values())
    assert result.baseline["score"] == pytest.approx(
        netshrink.perplexity(lm, loader), rel=1e-6)
    best = min(result.rows, key=lambda r: r["score"])
    assert best in result.frontier()
