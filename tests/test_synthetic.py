"""Data-free calibration inputs distilled from BatchNorm statistics (ZeroQ)."""

import pytest
import torch
from torch import nn

from netshrink.errors import ConfigError
from netshrink.synthetic import batchnorm_layers, statistics_loss, synthesize_inputs


def _trained_bn_net() -> nn.Module:
    """A small CNN whose BatchNorms saw inputs of mean 0.7, std 2 (not the noise prior)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    net.train()
    with torch.no_grad():
        for _ in range(50):
            net(0.7 + 2 * torch.randn(64, 3, 8, 8))
    return net.eval()


def _loss(net: nn.Module, x: torch.Tensor) -> float:
    seen = []
    norms = batchnorm_layers(net)
    hooks = [m.register_forward_pre_hook(lambda _m, a: seen.append(a[0])) for _, m in norms]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    targets = [(m.running_mean, (m.running_var + 1e-6).sqrt()) for _, m in norms]
    return statistics_loss(x, seen, targets).item()


def test_inputs_match_the_batchnorm_statistics_far_better_than_noise():
    net = _trained_bn_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = synthesize_inputs(net, 10, (3, 8, 8), iters=150, batch_size=5, progress=False)
    assert x.shape == (10, 3, 8, 8) and torch.isfinite(x).all()
    noise = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert _loss(net, x) < 0.2 * _loss(net, noise)
    # the model is untouched: same weights and running statistics, eval mode, grads on
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net.training and all(p.requires_grad for p in net.parameters())


def test_same_seed_same_inputs_and_other_seed_other_inputs():
    net = _trained_bn_net()
    a = synthesize_inputs(net, 4, (3, 8, 8), iters=5, seed=3, progress=False)
    b = synthesize_inputs(net, 4, (3, 8, 8), iters=5, seed=3, progress=False)
    c = synthesize_inputs(net, 4, (3, 8, 8), iters=5, seed=4, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_requests_raise_clearly():
    with pytest.raises(ConfigError, match="BatchNorm"):
        synthesize_inputs(nn.Sequential(nn.Conv2d(3, 4, 3)), 2, (3, 8, 8), progress=False)
    net = _trained_bn_net()
    with pytest.raises(ConfigError, match="shape"):
        synthesize_inputs(net, 2, (8, 8), progress=False)
    with pytest.raises(ConfigError, match="count"):
        synthesize_inputs(net, 0, (3, 8, 8), progress=False)
