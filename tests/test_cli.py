"""CLI smoke test on real Fashion-MNIST subsets: train-baseline, compress, eval, inspect."""

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
