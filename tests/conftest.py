"""Shared fixtures: small models and data that make tests fast and deterministic."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class SmallNet(nn.Module):
    """A conv net with BN, a 1x1 conv, a depthwise conv and a classifier (~12k weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 48, 1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.conv(x)))
        x = torch.relu(self.pw(self.dw(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def small_net() -> SmallNet:
    torch.manual_seed(0)
    net = SmallNet()
    with torch.no_grad():  # non-trivial BN statistics
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn2.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def toy_loader() -> torch.utils.data.DataLoader:
    """256 labelled random 1x12x12 images whose class depends on the mean intensity."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 1, 12, 12, generator=g)
    y = ((x.mean((1, 2, 3)) * 40).long().clamp(-5, 4) + 5)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


@pytest.fixture
def saved_reports(tmp_path):
    """A function (compressed model, uncompressed model like it) -> its three reports:
    live (`netshrink.report`), from the saved file's manifest alone (`inspect_file` +
    `report_from_manifest`, what `netshrink inspect` prints) and of the reloaded model."""
    import netshrink
    from netshrink.report import report_from_manifest

    def reports(small: nn.Module, like: nn.Module) -> list:
        path = tmp_path / "reported.nsk"
        netshrink.save(small, path)
        info = netshrink.inspect_file(path)
        return [netshrink.report(small),
                report_from_manifest(info["manifest"], info["header_bytes"]),
                netshrink.report(netshrink.load(path, like))]

    return reports
