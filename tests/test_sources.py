"""Models and data from spec strings (netshrink.sources, netshrink.datasources): every
model family and data kind on tiny models and data made in tmp_path, disjoint splits,
save -> load -> rebuild from the file's record, and the one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import netshrink
from netshrink import ConfigError, DataError, NetshrinkError
from netshrink.datasources import _split_indices
from netshrink.sources import HFLogits, model_preprocessing

FACTORY = textwrap.dedent("""
    from torch import nn

    def tiny(width=8, classes=3):
        return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(width, classes))
    """)


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "mynet.py"
    path.write_text(FACTORY)
    return path


def _png_folder(root: Path, classes: list[str] | None, n: int, grey: bool = False) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes or [""]:
        folder = root / c
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (20 + i, 24) if grey else (20 + i, 24, 3)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _one_line(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text and len(text) < 600, text
    return text


# ---------------------------------------------------------------------------------- models


def test_torchvision_weights_and_rebuild_from_the_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = netshrink.load_model("torchvision:squeezenet1_1", model_args={"num_classes": 4})
    assert model.netshrink_arch == {"name": "torchvision:squeezenet1_1",
                                    "kwargs": {"num_classes": 4}}
    save_file(model.state_dict(), tmp_path / "sq.safetensors")
    again = netshrink.load_model("torchvision:squeezenet1_1", tmp_path / "sq.safetensors",
                                 {"num_classes": 4})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values(), strict=True))
    small = netshrink.compress(again, target="x8")
    path = tmp_path / "sq.nsk"
    netshrink.save(small, path)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(netshrink.load(path)(x), small(x))  # no model_like: the record
    with pytest.raises(ConfigError) as e:  # weights of another architecture
        netshrink.load_model("torchvision:squeezenet1_0", tmp_path / "sq.safetensors",
                             {"num_classes": 4})
    assert re.search(r"\d+ shape mismatches \(e\.g\. ", _one_line(e.value))
    with pytest.raises(ConfigError) as e:
        netshrink.load_model("torchvision:mobilenet_v3_small", tmp_path / "sq.safetensors")
    assert re.search(r"\d+ missing keys .*\d+ unexpected keys", _one_line(e.value))
    with pytest.raises(ConfigError) as e:  # right architecture, other classifier size
        netshrink.load_model("torchvision:squeezenet1_1", tmp_path / "sq.safetensors")
    assert "2 shape mismatches" in _one_line(e.value)


def test_torch_state_dict_nested_and_ddp_prefix(tmp_path, factory_file):
    spec = f"{factory_file}:tiny"
    model = netshrink.load_model(spec)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "w.pt")
    again = netshrink.load_model(spec, tmp_path / "w.pt")
    assert torch.equal(again[0].weight, model[0].weight)
    torch.save({"a": 1}, tmp_path / "bad.pt")
    for bad in (tmp_path / "bad.pt", tmp_path / "missing.pt", tmp_path):
        with pytest.raises(ConfigError) as e:
            netshrink.load_model(spec, bad)
        _one_line(e.value)


def test_file_factory_is_rebuilt_only_when_named(tmp_path, factory_file):
    spec = f"{factory_file}:tiny"
    model = netshrink.load_model(spec, model_args={"width": 16})
    assert model.netshrink_arch == {"name": f"file:{spec}", "kwargs": {"width": 16}}
    small = netshrink.compress(model, target="8bit", min_weights=0)
    path = tmp_path / "tiny.nsk"
    netshrink.save(small, path)
    with pytest.raises(ConfigError) as e:  # never runs code a file names
        netshrink.load(path)
    assert f"--model {spec} --model-arg width=16" in _one_line(e.value)
    like = netshrink.load_model(spec, model_args={"width": 16})
    x = torch.randn(2, 3, 10, 10)
    assert torch.equal(netshrink.load(path, like)(x), small(x))
    for bad, words in ((f"{factory_file}:nothing", "no function 'nothing'"),
                       (f"{tmp_path}/gone.py:tiny", "does not exist")):
        with pytest.raises(ConfigError, match=words):
            netshrink.load_model(bad)
    with pytest.raises(ConfigError, match="bad --model-arg"):
        netshrink.load_model(spec, model_args={"depth": 3})


@pytest.mark.parametrize("spec, words", [
    ("keras:resnet", "unknown model family 'keras'"),
    ("torchvision:resnt18", "did you mean resnet18"),
    ("timm:not_a_model_at_all", "unknown timm model"),
    ("no_such_zoo_name", "unknown model 'no_such_zoo_name'"),
    ("hf:/nonexistent/dir", "no config.json"),
    ("model.py", "path/to/file.py:FACTORY"),
])
def test_unknown_models_are_one_line(spec, words):
    with pytest.raises(ConfigError) as e:
        netshrink.load_model(spec)
    assert words in _one_line(e.value)


def test_timm_model_and_its_preprocessing():
    model = netshrink.load_model("timm:resnet10t", model_args={"num_classes": 5})
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    pre = model_preprocessing(model)
    assert pre["image_size"] == model.pretrained_cfg["input_size"][-1]
    assert pre["mean"] == tuple(model.pretrained_cfg["mean"])


def test_torchvision_and_timm_import_after_import_netshrink():
    script = ("import sys, netshrink\n"
              "assert 'torchvision' not in sys.modules\n"
              "import timm, torchvision\n"
              "print(type(torchvision.models.resnet18()).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ResNet"


# ---------------------------------------------------------------------------------- data


def test_imagefolder_labelled_split_by_file(tmp_path):
    root = _png_folder(tmp_path / "photos", ["cat", "dog"], 5)
    model = netshrink.load_model("torchvision:resnet18")
    data = netshrink.load_data(f"imagefolder:{root}", model=model, image_size=32,
                               batch_size=4, eval_fraction=0.4)
    train, evals = data.train.dataset, data.eval.dataset
    assert data.labelled and data.kind == "image"
    assert not set(train.files) & set(evals.files)
    assert set(train.files) | set(evals.files) == set(root.rglob("*.png"))
    assert set(evals.labels) == {0, 1} and set(train.labels) == {0, 1}
    x, y = next(iter(data.eval))
    assert x.shape[1:] == (3, 32, 32) and y.dtype == torch.long
    assert "2 classes: cat, dog" in data.describe() and "\n" not in data.describe()
    again = netshrink.load_data(f"imagefolder:{root}", model=model, image_size=32,
                                eval_fraction=0.4)
    assert again.eval.dataset.files == evals.files  # same seed, same split


def test_imagefolder_flat_unlabelled_and_normalisation(tmp_path):
    root = _png_folder(tmp_path / "flat", None, 6, grey=True)
    data = netshrink.load_data(f"imagefolder:{root}", image_size=16, mean=[0.5, 0.5, 0.5],
                               std=[0.25, 0.25, 0.25])
    assert not data.labelled and not data.notes
    x = next(iter(data.train))
    assert isinstance(x, torch.Tensor) and x.shape[1:] == (3, 16, 16)
    assert x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6  # (v - 0.5) / 0.25 for v in [0, 1]
    noted = netshrink.load_data(f"imagefolder:{root}")
    assert any("ImageNet mean/std" in n for n in noted.notes)
    assert any("224" in n for n in noted.notes)


@pytest.mark.parametrize("layout, error", [("empty", DataError), ("one", DataError),
                                           ("mixed", DataError), ("missing", DataError)])
def test_bad_image_folders(tmp_path, layout, error):
    root = tmp_path / "imgs"
    if layout == "one":
        _png_folder(root, None, 1)
    elif layout == "mixed":
        _png_folder(root, ["a"], 2)
        _png_folder(root, None, 2)
    elif layout == "empty":
        root.mkdir()
    with pytest.raises(error) as e:
        netshrink.load_data(f"imagefolder:{root}")
    _one_line(e.value)


def test_npz_split_by_row(tmp_path):
    x = np.arange(50, dtype=np.float32).reshape(50, 1)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(50) % 3)
    data = netshrink.load_data(f"npz:{tmp_path / 'a.npz'}", batch_size=100)
    train = next(iter(data.train))[0][:, 0].tolist()
    evals = next(iter(data.eval))[0][:, 0].tolist()
    assert data.labelled and data.kind == "array" and len(evals) == 10
    assert not set(train) & set(evals) and len(set(train) | set(evals)) == 50
    np.savez(tmp_path / "u.npz", x=x)
    assert not netshrink.load_data(f"npz:{tmp_path / 'u.npz'}").labelled
    np.savez(tmp_path / "b.npz", inputs=x)
    with pytest.raises(DataError, match="no array 'x'"):
        netshrink.load_data(f"npz:{tmp_path / 'b.npz'}")


@pytest.mark.parametrize("spec", ["cifar10", "foo:bar", "imagefolder:", "text:/no/such",
                                  "npz:/no/such.npz", ""])
def test_bad_data_specs(spec):
    with pytest.raises(NetshrinkError) as e:
        netshrink.load_data(spec)
    _one_line(e.value)


def test_split_indices_are_disjoint_and_complete():
    groups = [i % 4 for i in range(37)]
    for seed in range(5):
        train, evals = _split_indices(groups, 0.25, seed, "x", "items")
        assert not set(train) & set(evals) and set(train) | set(evals) == set(range(37))
        assert {groups[i] for i in evals} == {0, 1, 2, 3}


def _tiny_lm(folder: Path) -> None:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(40)} | {"[UNK]": 40, "</s>": 41}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                         eos_token="</s>").save_pretrained(folder)
    config = transformers.LlamaConfig(vocab_size=42, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


def test_hf_language_model_on_text_documents(tmp_path):
    _tiny_lm(tmp_path / "lm")
    docs = [" ".join(f"w{(7 * d + j) % 40}" for j in range(30)) for d in range(6)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs))
    model = netshrink.load_model(f"hf:{tmp_path / 'lm'}")
    assert isinstance(model, HFLogits) and model.causal_lm
    data = netshrink.load_data(f"text:{tmp_path / 'corpus.txt'}", model=model, seq_len=8,
                               eval_fraction=0.34)
    assert data.kind == "text" and not data.labelled and "2 documents" in data.split
    blocks = next(iter(data.train))[0]
    assert blocks.shape[1] == 8 and blocks.dtype == torch.long
    before = netshrink.score(model, data)
    assert before.metric == "perplexity" and not before.higher_is_better
    small = netshrink.compress(model, target="8bit", min_weights=0)
    netshrink.save(small, tmp_path / "lm.nsk")
    back = netshrink.load(tmp_path / "lm.nsk")  # rebuilt from the hf: record
    assert torch.equal(back(blocks), small(blocks))
    assert netshrink.score(back, data).value == pytest.approx(
        netshrink.score(small, data).value)
    with pytest.raises(ConfigError, match="tokenizer of an hf: model"):
        netshrink.load_data(f"text:{tmp_path / 'corpus.txt'}")
    with pytest.raises(DataError, match="fewer than --seq-len"):
        netshrink.load_data(f"text:{tmp_path / 'corpus.txt'}", model=model, seq_len=4096)


# ---------------------------------------------------------------------------------- metrics


class _NextToken(nn.Module):
    """Logits that put all mass on token (t + 1) mod V: perplexity 1 on counting blocks."""

    def __init__(self, vocab: int, sure: bool) -> None:
        super().__init__()
        self.vocab, self.sure = vocab, sure
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.vocab)
        if self.sure:
            logits.scatter_(-1, ((ids + 1) % self.vocab)[..., None], 50.0)
        return logits


def test_perplexity_bounds():
    ids = torch.arange(64).reshape(4, 16) % 10
    loader = [(ids,)]
    assert netshrink.perplexity(_NextToken(10, True), loader) == pytest.approx(1.0, abs=1e-3)
    assert netshrink.perplexity(_NextToken(10, False), loader) == pytest.approx(10.0)


def test_score_accuracy_agreement_and_missing_reference(tmp_path, factory_file):
    model = netshrink.load_model(f"{factory_file}:tiny")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "l.npz", x=x, y=rng.integers(0, 3, 40))
    np.savez(tmp_path / "u.npz", x=x)
    labelled = netshrink.load_data(f"npz:{tmp_path / 'l.npz'}")
    unlabelled = netshrink.load_data(f"npz:{tmp_path / 'u.npz'}")
    acc = netshrink.score(model, labelled)
    assert acc.metric == "accuracy" and 0 <= acc.value <= 1
    assert netshrink.score(model, unlabelled, model).value == 1.0
    with pytest.raises(ConfigError, match="agreement with the original"):
        netshrink.score(model, unlabelled)
