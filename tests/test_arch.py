"""Tests of netshrink.arch: the architecture registry that lets `load` rebuild a model
from the name its file records, without ever importing a module a file names."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_fileformat import _rewrite
from torch import nn

import netshrink
from netshrink import arch
from netshrink.errors import ConfigError, FormatError
from netshrink.fileformat import from_bytes, read_manifest, to_bytes

DATA = Path(__file__).parent / "data"
LEGACY = DATA / "main-b590c17-mobilenetv2_small.nsk.gz"


def tiny(width: int = 16, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, classes))


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> str:
    """`tiny` registered as "test-tiny" for this test only."""
    monkeypatch.setattr(arch, "_REGISTRY", dict(arch._REGISTRY))
    arch.register_arch("test-tiny", tiny)
    return "test-tiny"


def test_create_records_every_argument(registered: str) -> None:
    model = arch.create_arch(registered, width=32)
    record = arch.arch_of(model)
    assert record == {"name": registered, "kwargs": {"width": 32, "classes": 3}}
    assert json.loads(json.dumps(record)) == record
    assert arch.arch_of(arch.create_arch(**record)) == record
    assert arch.arch_of(nn.Linear(2, 2)) is None
    arch.arch_of(model)["kwargs"]["width"] = 1  # a copy: the record stays intact
    assert arch.arch_of(model) == record
    assert arch.arch_entry(registered).module == __name__
    assert registered in arch.registered_archs()


def test_bad_names_and_arguments(registered: str) -> None:
    with pytest.raises(ConfigError, match="unknown architecture 'nope'; registered: .*test-tiny"):
        arch.create_arch("nope")
    with pytest.raises(ConfigError, match="bad arguments"):
        arch.create_arch(registered, depth=3)
    with pytest.raises(ConfigError, match="JSON"):
        arch.create_arch(registered, width=object())
    with pytest.raises(ConfigError, match="already registered by"):
        arch.register_arch(registered, tiny, module="someone.else")
    arch.register_arch(registered, tiny)  # the same module again (a reload) replaces it
    with pytest.raises(ConfigError, match="module"):
        arch.register_arch("x", tiny, module="not a module")


def test_file_names_the_provider_and_loads_without_model_like(registered: str) -> None:
    torch.manual_seed(0)
    model = arch.create_arch(registered, width=64)
    small = netshrink.compress(model, "kmeans", "4bit", min_weights=0)
    raw = to_bytes(small)
    assert read_manifest(raw)["arch"] == {"name": registered, "module": __name__,
                                          "kwargs": {"width": 64, "classes": 3}}
    x = torch.randn(4, 8)
    assert torch.equal(from_bytes(raw)(x), small(x))


def _with_arch(raw: bytes, record: object) -> bytes:
    return _rewrite(raw, lambda manifest: manifest.__setitem__("arch", record))


def test_unregistered_arch_names_its_module_and_imports_nothing(
        registered: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = to_bytes(arch.create_arch(registered))
    flag = tmp_path / "imported"
    (tmp_path / "evil_provider.py").write_text(f"open({str(flag)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    record = {"name": "unregistered-net", "kwargs": {}, "module": "evil_provider"}
    with pytest.raises(ConfigError, match="'unregistered-net' is not registered .*"
                                          "import evil_provider first, or pass model_like"):
        from_bytes(_with_arch(raw, record))
    assert not flag.exists() and "evil_provider" not in sys.modules
    del record["module"]  # files written before the record named its module
    with pytest.raises(ConfigError, match=f"import {arch.LEGACY_MODULE} first"):
        from_bytes(_with_arch(raw, record))
    record["module"] = "os; import evil_provider"  # not a module name: not repeated
    with pytest.raises(ConfigError, match="import the module that registers it first"):
        from_bytes(_with_arch(raw, record))
    assert isinstance(from_bytes(_with_arch(raw, record), tiny()), nn.Sequential)


def test_malformed_arch_record_is_a_format_error(registered: str) -> None:
    raw = to_bytes(arch.create_arch(registered))
    for bad in ([1, 2], {"name": 5}, {"name": registered, "kwargs": [1]},
                {"name": registered, "kwargs": {"width": "wide"}}):
        with pytest.raises(FormatError):
            from_bytes(_with_arch(raw, bad))


_LEGACY = textwrap.dedent("""
    import gzip, json, sys
    import torch
    import netshrink
    raw = gzip.decompress(open({path!r}, "rb").read())
    try:
        netshrink.fileformat.from_bytes(raw)
        print("loaded without the zoo")
    except netshrink.ConfigError as e:
        print("error:", e)
    import netshrink_lab.zoo  # registers the zoo's architectures
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    out = netshrink.fileformat.from_bytes(raw)(x)
    print(json.dumps(out.tolist()))
""")


def test_file_written_by_main_before_the_registry_still_loads() -> None:
    """Bytes saved by netshrink main at b590c17 (arch record without "module"): a fresh
    process says which module registers the arch, and loads them once it is imported."""
    proc = subprocess.run([sys.executable, "-c", _LEGACY.format(path=str(LEGACY))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, out = proc.stdout.strip().splitlines()[-2:]
    assert first.startswith("error: ") and "'mobilenetv2_small' is not registered" in first
    assert f"import {arch.LEGACY_MODULE} first, or pass model_like" in first
    expected = torch.tensor(json.loads(LEGACY.with_suffix("").with_suffix(".json")
                                       .read_text())["output"])
    torch.testing.assert_close(torch.tensor(json.loads(out)), expected, rtol=1e-6, atol=1e-9)
    assert "module" not in read_manifest(gzip.decompress(LEGACY.read_bytes()))["arch"]
