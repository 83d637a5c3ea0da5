"""CLI smoke test on real Fashion-MNIST subsets: train-baseline, compress, eval, inspect."""

import json
from pathlib import Path

import pytest

from netshrink.cli import build_parser, main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train-baseline", "compress", "eval", "inspect", "demo"):
        assert cmd in out
    assert build_parser().parse_args(["compress", "--model", "resnet20", "-o", "x"]).target


def test_methods_command(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "kmeans" in out and "resnet20" in out
    for name in ("pqf", "dkm", "alds", "smh"):
        assert any(line.startswith(f"{name} ") for line in out.splitlines())
    # each method's options with their defaults
    assert "keep_ratio=None" in out and "cluster_dim=1" in out and "permute_iters=10000" in out


def test_errors_are_one_line_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.nsk"
    bad.write_bytes(b"not a file")
    assert main(["inspect", str(bad)]) == 2
    assert "error:" in capsys.readouterr().err


def test_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    assert main(["train-baseline", "resnet20", "--epochs", "1", "--subset-train", "256",
                 "--subset-test", "128"]) == 0
    assert (tmp_path / "cache" / "baselines" / "resnet20-fashion-mnist.safetensors").is_file()
    out = tmp_path / "r20.nsk"
    assert main(["compress", "--model", "resnet20", "--target", "x8", "--epochs", "1",
                 "--subset-train", "256", "--subset-test", "128", "-o", str(out),
                 "--option", "per_channel=false", "--bn-recalibration", "2"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "fp32 baseline" in text and "compressed" in text
    assert main(["eval", str(out), "--subset-test", "128"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "B header" in text and "layer1.0.conv1" in text and "weights (" in text
    assert main(["inspect", str(out), "--json"]) == 0
    assert '"version": 1' in capsys.readouterr().out


# ------------------------------------------------------------------ your model, your data


def _error_line(capsys) -> str:
    """The one error line of a failed command: no traceback, exactly one error line."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("netshrink: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A flat folder of 10 generated photos and torchvision resnet18 random weights."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    import netshrink

    tmp_path = tmp_path_factory.mktemp("byom")
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 48, 3), dtype=np.uint8)).save(
            folder / f"img{i}.png")
    save_file(netshrink.load_model("torchvision:resnet18").state_dict(),
              tmp_path / "r18.safetensors")
    return folder, tmp_path / "r18.safetensors"


def test_bring_your_own_model_readme_flow(photos, tmp_path, capsys, monkeypatch):
    """The README's example, exactly: torchvision resnet18 with weights, a folder of images."""
    folder, weights = photos
    monkeypatch.chdir(folder.parent)
    assert main(["compress", "--model", "torchvision:resnet18", "--weights", "r18.safetensors",
                 "--data", "imagefolder:photos/", "--method", "kmeans", "--target", "x8",
                 "-o", "r18.nsk"]) == 0
    out = capsys.readouterr().out
    assert "x8.0" in out and "agreement" in out and "2 evaluation items" in out
    assert (folder.parent / "r18.nsk").is_file()
    assert main(["eval", "r18.nsk", "--data", "imagefolder:photos/"]) == 2  # no original
    assert "--weights" in _error_line(capsys)
    assert main(["eval", "r18.nsk", "--data", "imagefolder:photos/", "--model",
                 "torchvision:resnet18", "--weights", "r18.safetensors"]) == 0
    assert "agreement" in capsys.readouterr().out
    assert main(["inspect", "r18.nsk"]) == 0


def _file_model_and_npz(tmp_path: Path, rows: int, labels: bool) -> None:
    """tmp_path/net.py:net (a small MLP on 3x4x4 inputs) and tmp_path/d.npz with `rows`
    random inputs x (seed 0) and, with `labels`, classes y in 0..2."""
    import numpy as np

    (tmp_path / "net.py").write_text(
        "from torch import nn\n"
        "def net():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 3))\n")
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(rows, 3, 4, 4)).astype(np.float32)}
    if labels:
        arrays["y"] = rng.integers(0, 3, rows)
    np.savez(tmp_path / "d.npz", **arrays)


def test_eval_of_a_file_factory_model_names_the_fix(tmp_path, capsys):
    _file_model_and_npz(tmp_path, 30, labels=True)
    spec, out = f"{tmp_path / 'net.py'}:net", str(tmp_path / "n.nsk")
    assert main(["compress", "--model", spec, "--data", f"npz:{tmp_path / 'd.npz'}",
                 "--target", "8bit", "--min-weights", "0", "-o", out]) == 0
    assert "baseline accuracy" in capsys.readouterr().out
    assert main(["eval", out, "--data", f"npz:{tmp_path / 'd.npz'}"]) == 2
    assert f"--model {spec}" in _error_line(capsys)
    assert main(["eval", out, "--data", f"npz:{tmp_path / 'd.npz'}", "--model", spec]) == 0
    assert "accuracy" in capsys.readouterr().out


def _truncated(tmp_path):
    import torch

    import netshrink

    path = tmp_path / "t.nsk"
    netshrink.save(torch.nn.Linear(64, 64), path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    return path


@pytest.mark.parametrize("argv, words", [
    (["inspect", "{tmp}/missing.nsk"], "cannot read"),
    (["inspect", "{tmp}"], "is a directory"),
    (["inspect", "{truncated}"], "damaged"),
    (["compress", "--model", "torchvision:resnet18", "--weights", "{tmp}/none.safetensors",
      "-o", "{tmp}/o.nsk"], "does not exist"),
    (["compress", "--checkpoint", "{tmp}/none.safetensors", "--arch", "resnet20",
      "-o", "{tmp}/o.nsk"], "does not exist"),
    (["compress", "--model", "torchvision:resnet34", "--weights", "{weights}",
      "--data", "imagefolder:{photos}", "-o", "{tmp}/o.nsk"], "missing keys"),
    (["compress", "--model", "keras:net", "-o", "{tmp}/o.nsk"], "unknown model family"),
    (["compress", "--model", "resnet2", "-o", "{tmp}/o.nsk"], "unknown model"),
    (["compress", "--model", "torchvision:resnet18", "--data", "cifar", "-o", "{tmp}/o.nsk"],
     "unknown data set"),
    (["compress", "--model", "torchvision:resnet18", "--data", "imagefolder:{tmp}/empty",
      "-o", "{tmp}/o.nsk"], "no images"),
    (["compress", "--model", "resnet20", "--method", "foo", "-o", "{tmp}/o.nsk"],
     "unknown method"),
    (["compress", "--model", "resnet20", "--target", "x0", "-o", "{tmp}/o.nsk"], "x1"),
    (["compress", "--model", "resnet20", "--option", "nope=1", "-o", "{tmp}/o.nsk"],
     "unknown option"),
    (["compress", "--model", "resnet20", "--mean", "a,b", "-o", "{tmp}/o.nsk"], "--mean"),
])
def test_user_mistakes_are_one_line_exit_2(argv, words, photos, tmp_path, capsys, monkeypatch):
    from netshrink_lab import zoo

    def no_training(*args, **kwargs):
        raise AssertionError("a mistake must be reported before any baseline is trained")

    monkeypatch.setattr(zoo, "load_or_train_baseline", no_training)
    (tmp_path / "empty").mkdir()
    folder, weights = photos
    names = {"tmp": tmp_path, "photos": folder, "weights": weights,
             "truncated": _truncated(tmp_path) if "{truncated}" in argv else ""}
    assert main([a.format(**names) for a in argv]) == 2
    assert words in _error_line(capsys)


def test_sweep_on_your_own_model_and_image_folder(photos, tmp_path, capsys):
    """`netshrink sweep` reads --model/--data as compress does: a file.py model on a flat
    folder of unlabelled photos is measured by agreement with the original."""
    folder, _ = photos
    (tmp_path / "net.py").write_text(
        "from torch import nn\n"
        "def net():\n"
        "    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))\n")
    out_dir = tmp_path / "sweep"
    assert main(["sweep", "--model", f"{tmp_path / 'net.py'}:net", "--data",
                 f"imagefolder:{folder}", "--image-size", "32", "--methods", "kmeans",
                 "--targets", "x4,x8", "--min-weights", "0", "--out-dir", str(out_dir)]) == 0
    results = json.loads((out_dir / "results.json").read_text())
    assert results["metric"] == "agreement"
    assert [r["status"] for r in results["rows"]] == ["ok", "ok"]
    assert (out_dir / "report.html").is_file() and "kmeans" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--calibrate", "off", "--calibration-samples", "8"], "--calibration-samples"),
    (["--calibration-samples", "0"], "samples"),
    (["--calibrate", "off", "--reconstruct", "10"], "--reconstruct"),
    (["--reconstruct", "-1"], "--reconstruct"),
])
def test_calibration_flags_checked_before_work(argv, words, capsys, tmp_path):
    assert main(["compress", "--model", "no/such/file.py:net", "--method", "kmeans",
                 "-o", str(tmp_path / "x.nsk"), *argv]) == 2
    assert words in _error_line(capsys)


def test_compress_calibrates_on_request_and_not_when_off(tmp_path, capsys):
    _file_model_and_npz(tmp_path, 40, labels=False)
    base = ["compress", "--model", f"{tmp_path / 'net.py'}:net", "--data",
            f"npz:{tmp_path / 'd.npz'}", "--target", "2bit", "--min-weights", "0"]
    assert main([*base, "--calibrate", "on", "--calibration-samples", "16",
                 "-o", str(tmp_path / "on.nsk")]) == 0
    assert "calibration: 16 samples (data)" in capsys.readouterr().out
    assert main([*base, "--calibrate", "off", "-o", str(tmp_path / "off.nsk")]) == 0
    assert "calibration:" not in capsys.readouterr().out
    # --reconstruct: block reconstruction after calibration, same file bytes, any method
    assert main([*base, "--calibration-samples", "32", "--reconstruct", "5",
                 "-o", str(tmp_path / "rec.nsk")]) == 0
    assert "block reconstruction" in capsys.readouterr().out
    def tensor_bytes(path: Path) -> int:  # safetensors: u64 header length, header, data
        return path.stat().st_size - 8 - int.from_bytes(path.read_bytes()[:8], "little")
    assert tensor_bytes(tmp_path / "rec.nsk") == tensor_bytes(tmp_path / "off.nsk")
