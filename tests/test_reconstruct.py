"""Block-wise reconstruction (BRECQ) of compressed models: errors go down, stored bytes,
codes, the teacher and BatchNorm statistics do not move, bad inputs fail before work."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import netshrink
from netshrink.blocks import find_blocks, trace
from netshrink.errors import ConfigError, DataError
from netshrink.layers import PalettizedLayer
from netshrink.reconstruct import Reconstruct, reconstruct


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    """Stem, three residual blocks, head; `glue` puts a scaling between blocks (then block
    inputs are not the previous outputs and must be captured by re-running the model)."""

    def __init__(self, c: int = 8, glue: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.blocks = nn.ModuleList(ResBlock(c) for _ in range(3))
        self.fc = nn.Linear(c, 10)
        self.glue = glue

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
            if self.glue:
                x = x * 0.9
        return self.fc(x.mean((2, 3)))


class Layer(nn.Module):
    """A transformer-like layer called as layer(h, mask=..., pos=...), returning (h,)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor
                ) -> tuple[torch.Tensor]:
        a = self.norm1(h + pos)
        scores = self.q(a) @ self.k(a).transpose(1, 2) / math.sqrt(a.shape[-1]) + mask
        h = h + scores.softmax(-1) @ self.v(a)
        return (h + self.down(torch.nn.functional.gelu(self.up(self.norm2(h)))),)


class Stack(nn.Module):
    def __init__(self, d: int = 32, vocab: int = 40, length: int = 12) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(length, d))
        self.layers = nn.ModuleList(Layer(d) for _ in range(3))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        mask = torch.full((t, t), float("-inf")).triu(1)
        h = self.emb(ids)
        for layer in self.layers:
            h = layer(h, mask=mask, pos=self.pos[:t])[0]
        return self.head(self.norm(h))


def _resnet(glue: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = ResNet(glue=glue)
    net.train()
    with torch.no_grad():  # BatchNorm statistics of real activations
        for _ in range(3):
            net(torch.randn(32, 3, 8, 8))
    return net.eval()


FAST = Reconstruct(steps=25, lr=3e-3, batch_size=16, progress=False)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_report(report: dict) -> None:
    for rec in report["blocks"]:
        assert rec["error_after"] <= rec["error_before"], rec
    assert any(r["error_after"] < r["error_before"] for r in report["blocks"])
    assert report["output_error_after"] < report["output_error_before"]


@pytest.mark.parametrize("glue", [False, True])
def test_kmeans_resnet_errors_go_down_and_stored_form_stays(tmp_path, glue):
    teacher = _resnet(glue)
    student = netshrink.compress(teacher, "kmeans", "2bit", min_weights=0)
    before_bytes = netshrink.save(student, tmp_path / "before.nsk")
    codes = {n: m.codes.clone() for n, m in student.named_modules()
             if isinstance(m, PalettizedLayer)}
    books = {n: m.codebook.detach().clone() for n, m in student.named_modules()
             if isinstance(m, PalettizedLayer)}
    teacher_state = _state(teacher)
    stats = {k: v for k, v in _state(student).items() if "running_" in k}
    report = reconstruct(student, teacher, torch.randn(48, 3, 6, 6), FAST)
    _check_report(report)
    assert report["chained"] is not glue
    assert [r["block"] for r in report["blocks"]] == [
        "stem", "blocks.0", "blocks.1", "blocks.2", "head"]
    after_bytes = netshrink.save(student, tmp_path / "after.nsk")
    assert after_bytes == before_bytes == (tmp_path / "after.nsk").stat().st_size
    for n, m in student.named_modules():
        if isinstance(m, PalettizedLayer):
            assert torch.equal(m.codes, codes[n])
    assert any(not torch.equal(m.codebook, books[n]) for n, m in student.named_modules()
               if isinstance(m, PalettizedLayer))
    for k, v in _state(teacher).items():
        assert torch.equal(v, teacher_state[k]), k
    for k, v in stats.items():
        assert torch.equal(student.state_dict()[k], v), k
    assert not student.training and not teacher.training
    again = netshrink.load(tmp_path / "after.nsk", teacher)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(again(x), student(x))


def test_soft_codes_rechoose_codes_within_the_same_bytes(tmp_path):
    teacher = _resnet()
    fixed = netshrink.compress(teacher, "kmeans", "2bit", min_weights=0)
    soft = netshrink.compress(teacher, "kmeans", "2bit", min_weights=0)
    size = netshrink.save(soft, tmp_path / "before.nsk")
    codes = {n: m.codes.clone() for n, m in soft.named_modules()
             if isinstance(m, PalettizedLayer)}
    x = torch.randn(64, 3, 6, 6)
    steps = dict(steps=200, lr=3e-3, batch_size=16, progress=False)
    r_fixed = reconstruct(fixed, teacher, x, Reconstruct(**steps))
    r_soft = reconstruct(soft, teacher, x, Reconstruct(codes="soft", **steps))
    _check_report(r_soft)
    assert sum(r.get("codes_changed", 0) for r in r_soft["blocks"]) > 0
    assert any(r.get("codes_relaxed", 0) > 0 for r in r_soft["blocks"])
    changed = [n for n, m in soft.named_modules() if isinstance(m, PalettizedLayer)
               and not torch.equal(m.codes, codes[n])]
    assert changed
    for m in soft.modules():  # hardened: plain decode again, codes in range
        if isinstance(m, PalettizedLayer):
            assert "decode_weight" not in m.__dict__
            assert int(m.codes.max()) < m.codebook.shape[0]
    def block_errors(report: dict) -> list[float]:
        return [r["error_after"] for r in report["blocks"] if r["block"].startswith("blocks.")]
    # the blocks' palettes have codes to re-choose: each block ends nearer its target
    assert all(s < f for s, f in zip(block_errors(r_soft), block_errors(r_fixed)))
    assert netshrink.save(soft, tmp_path / "after.nsk") == size
    again = netshrink.load(tmp_path / "after.nsk", teacher)
    y = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(again(y), soft(y))


def test_soft_codes_start_at_the_original_weight_and_harden_to_bracketing_entries():
    from netshrink.softcodes import SoftCodes, beta_at
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3)
    layer = netshrink.compress(nn.Sequential(conv), "kmeans", "2bit", min_weights=0)[0]
    assert isinstance(layer, PalettizedLayer)
    scale = (torch.ones(6) if layer.scale is None else layer.scale.detach()).view(-1, 1, 1, 1)
    u = conv.weight.detach() / scale  # the weights in the codebook's units
    sc = SoftCodes(layer, conv.weight.detach(), start="weights")
    book = layer.codebook.detach()[:, 0]
    gap = float(book.sort().values.diff().max())
    inside = (u >= book.min()) & (u <= book.max())
    # h starts clamped to [0.01, 0.99]: w_soft is within 1% of a gap of the weight
    soft = layer.decode_weight().detach() / scale
    assert float((soft - u)[inside].abs().max()) <= 0.01 * gap + 1e-6
    assert bool(inside.any()) and bool((~inside).any())
    sc.harden()
    assert "decode_weight" not in layer.__dict__
    hard = book[layer.codes.long()].reshape(u.shape)
    # every code is one of the two entries around the weight, or the nearest end
    assert float((hard - u)[inside].abs().max()) <= gap + 1e-6
    ends = torch.where(u < book.min(), book.min(), book.max())
    assert torch.equal(hard[~inside], ends[~inside])
    # start="codes": the relaxation starts at the layer's codes (1% towards a neighbour)
    current = layer.codes.clone()
    decoded = layer.decode_weight().detach()
    sc = SoftCodes(layer, conv.weight.detach(), start="codes")
    assert float((layer.decode_weight().detach() - decoded).abs().max()) <= (
        0.01 * gap * float(scale.max()) + 1e-6)
    with torch.no_grad():
        sc.v.fill_(10.0)  # every h -> 1: each code moves to its neighbour towards w
    sc.harden()
    order = book.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(book.numel())
    moved = (rank[layer.codes.long()] - rank[current.long()]).abs()
    assert int(moved.max()) == 1 and bool((moved == 1).any())
    assert beta_at(0, 100) is None and beta_at(20, 100) == 20.0
    assert abs(beta_at(100, 100) - 2.0) < 1e-9


def test_alds_transformer_stack_with_keyword_arguments():
    torch.manual_seed(0)
    teacher = Stack().eval()
    student = netshrink.compress(teacher, "alds", "x2", min_weights=0)
    ids = torch.randint(0, 40, (48, 12))
    assert find_blocks(teacher) == ["layers.0", "layers.1", "layers.2"]
    report = reconstruct(student, teacher, ids, FAST)
    _check_report(report)
    assert report["chained"]
    assert report["blocks"][-1]["block"] == "head"


def test_final_distillation_runs_in_fit_and_keeps_batchnorm_statistics():
    teacher = _resnet()
    student = netshrink.compress(teacher, "kmeans", "2bit", min_weights=0)
    stats = {k: v for k, v in _state(student).items() if "running_" in k}
    cfg = Reconstruct(steps=10, batch_size=16, final_steps=6, progress=False)
    report = reconstruct(student, teacher, torch.randn(32, 3, 8, 8), cfg)
    assert report["final"]["steps"] >= 6
    assert report["final"]["error_after"] <= report["final"]["error_before"]
    for k, v in stats.items():
        assert torch.equal(student.state_dict()[k], v), k


def test_block_discovery_on_zoo_and_torchvision_resnets():
    from netshrink.compat import torchvision_shim
    from netshrink_lab import zoo
    assert find_blocks(zoo.create("resnet20")) == [
        f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    torchvision_shim()
    import torchvision
    net = torchvision.models.resnet18(weights=None).eval()
    blocks = find_blocks(net)
    assert blocks == [f"layer{s}.{i}" for s in (1, 2, 3, 4) for i in range(2)]
    tr = trace(net, blocks, torch.randn(1, 3, 32, 32))
    assert tr.chained and tr.stem == ["conv1", "bn1"] and tr.head == ["fc"]


def test_memory_cap_lowers_the_samples_and_says_so():
    teacher = _resnet()
    student = netshrink.compress(teacher, "kmeans", "2bit", min_weights=0)
    cfg = Reconstruct(steps=2, batch_size=16, memory_mb=0.1, progress=False)
    report = reconstruct(student, teacher, torch.randn(64, 3, 8, 8), cfg)
    assert report["samples"] < report["samples_given"] == 64
    assert any("memory_mb" in note for note in report["notes"])


@pytest.mark.parametrize("inputs, message", [
    (torch.randn(32, 5, 8, 8), "do not run through the model"),
    (torch.randn(32, 3, 8, 8).to(torch.int64), "dtype int64"),
    (torch.full((32, 3, 8, 8), float("nan")), "NaN"),
    (torch.randn(8, 3, 8, 8), "fewer than batch_size"),
    ([torch.randn(16, 3, 8, 8), torch.randn(16, 3, 4, 4)], "differ in shape"),
])
def test_bad_inputs_raise_before_any_work(inputs, message):
    teacher = _resnet()
    student = netshrink.compress(teacher, "kmeans", "2bit", min_weights=0)
    state = _state(student)
    with pytest.raises(DataError, match=message) as info:
        reconstruct(student, teacher, inputs, FAST)
    assert "\n" not in str(info.value)
    for k, v in _state(student).items():
        assert torch.equal(v, state[k]), k


def test_non_finite_outputs_give_data_error():
    teacher = _resnet()
    teacher.fc.weight.data.fill_(float("inf"))
    student = netshrink.compress(_resnet(), "kmeans", "2bit", min_weights=0)
    with pytest.raises(DataError, match="non-finite"):
        reconstruct(student, teacher, torch.randn(32, 3, 8, 8), FAST)


@pytest.mark.parametrize("kwargs", [
    {"steps": -1}, {"lr": 0}, {"lr": float("nan")}, {"batch_size": 0}, {"memory_mb": -1},
    {"blocks": ()}, {"blocks": ("",)}, {"final_steps": 1.5}, {"seed": -1},
    {"codes": "hard"}, {"round_weight": 0}, {"codes_lr": -1}, {"soft_start": "zero"},
])
def test_config_is_checked_when_built(kwargs):
    with pytest.raises(ConfigError):
        Reconstruct(**kwargs)


def test_named_blocks_are_checked():
    teacher = _resnet()
    student = netshrink.compress(teacher, "kmeans", "2bit", min_weights=0)
    with pytest.raises(ConfigError, match="not a module"):
        reconstruct(student, teacher, torch.randn(32, 3, 8, 8),
                    Reconstruct(blocks=("nope",), progress=False))
    with pytest.raises(ConfigError, match="nested"):
        reconstruct(student, teacher, torch.randn(32, 3, 8, 8),
                    Reconstruct(blocks=("blocks", "blocks.0"), progress=False))
