"""Tests of netshrink.train: config checks, learning, distillation, schedule, hooks,
atomic checkpoints, bit-exact resume, BatchNorm recalibration, metrics, distributed."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from netshrink.errors import ConfigError
from netshrink.train import (
    CHECKPOINT_NAME,
    Finetune,
    FitResult,
    StepHook,
    agreement,
    distillation_loss,
    evaluate,
    fit,
    recalibrate_batchnorm,
)
from netshrink.train import loop as train_module  # _lr_at, and os/torch to patch

# --------------------------------------------------------------------------- fixtures


def _task(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A linearly separable 4-class problem on 8 features."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 8, generator=gen)
    weights = torch.randn(8, 4, generator=torch.Generator().manual_seed(1234))
    return inputs, (inputs @ weights).argmax(dim=1)


def _mlp(seed: int = 0, dropout: float = 0.1) -> nn.Module:
    """A small MLP with BatchNorm and Dropout (both matter for exact resume)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(32, 4))


def _loader(n: int = 256, batch_size: int = 32, seed: int = 0) -> DataLoader:
    inputs, labels = _task(n, seed)
    return DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, shuffle=True)


class _BareTensors(Dataset):
    """Unlabelled data whose batches are bare tensors."""

    def __init__(self, inputs: torch.Tensor) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.inputs[index]


class _Recorder(StepHook):
    """Records every hook call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def on_train_start(self, model: nn.Module) -> None:
        self.calls.append(("start", -1))

    def before_step(self, model: nn.Module, step: int) -> None:
        self.calls.append(("before", step))

    def after_step(self, model: nn.Module, step: int) -> None:
        self.calls.append(("after", step))

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        self.calls.append(("epoch", epoch))

    def of(self, kind: str) -> list[int]:
        return [value for name, value in self.calls if name == kind]


class _Killed(Exception):
    """Stands for the process being killed."""


class _Crash(StepHook):
    """Simulates a kill: raises before the given global step."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def before_step(self, model: nn.Module, step: int) -> None:
        if step == self.at_step:
            raise _Killed(f"simulated kill at step {step}")


def _quiet(**kwargs: object) -> Finetune:
    return Finetune(progress=False, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs", [
    {"epochs": -1},
    {"epochs": 1.5},
    {"epochs": True},
    {"lr": 0.0},
    {"lr": -1e-3},
    {"lr": float("nan")},
    {"distill_weight": -0.1},
    {"distill_weight": 1.5},
    {"temperature": 0.0},
    {"temperature": -2.0},
    {"optimizer": "lamb"},
    {"schedule": "step"},
    {"resume": True},
    {"momentum": 1.0},
    {"weight_decay": -1.0},
    {"min_lr": -1e-6},
    {"lr": 1e-3, "min_lr": 1e-2},
    {"warmup_steps": -1},
    {"batch_size": 0},
    {"max_steps_per_epoch": 0},
    {"bn_recalibration_batches": -1},
    {"seed": -1},
    {"grad_clip": 0.0},
])
def test_invalid_config_raises(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        Finetune(**kwargs)


def test_config_error_is_value_error_and_names_field() -> None:
    with pytest.raises(ValueError, match="distill_weight"):
        Finetune(distill_weight=2.0)
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        Finetune(resume=True)


def test_default_learning_rates() -> None:
    assert Finetune().effective_lr == 1e-3
    assert Finetune(optimizer="sgd").effective_lr == 0.05
    assert Finetune(optimizer="sgd", lr=0.2).effective_lr == 0.2
    assert Finetune(min_lr=0.0, lr=1e-4, schedule="constant").effective_lr == 1e-4
    with pytest.raises(dataclasses.FrozenInstanceError):
        Finetune().epochs = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- learning


def test_fit_learns_separable_task() -> None:
    model, loader = _mlp(), _loader()
    eval_loader = DataLoader(TensorDataset(*_task(128, seed=7)), batch_size=64)
    before = evaluate(model, eval_loader)
    result = fit(model, loader, _quiet(epochs=6, lr=1e-2), eval_loader=eval_loader)
    assert isinstance(result, FitResult) and result.resumed_from is None
    losses = [record["loss"] for record in result.history]
    assert [record["epoch"] for record in result.history] == list(range(6))
    assert losses[-1] < 0.6 * losses[0]
    assert result.history[-1]["train_acc"] > result.history[0]["train_acc"]
    assert before < 0.5
    assert result.history[-1]["eval_acc"] > 0.75
    assert result.history[-1]["eval_acc"] == evaluate(model, eval_loader)
    assert not model.training  # left in eval mode


def test_fit_uses_config_batch_size_and_max_steps() -> None:
    hook = _Recorder()
    fit(_mlp(), _loader(batch_size=32), _quiet(epochs=2, batch_size=100), hooks=[hook])
    assert len(hook.of("before")) == 2 * 3  # ceil(256 / 100) = 3 steps per epoch
    hook = _Recorder()
    fit(_mlp(), _loader(), _quiet(epochs=2, max_steps_per_epoch=2), hooks=[hook])
    assert hook.of("before") == [0, 1, 2, 3]


def test_distillation_moves_student_towards_teacher() -> None:
    torch.manual_seed(3)
    teacher = nn.Linear(8, 4)
    inputs, _ = _task(512, seed=5)
    probe = DataLoader(TensorDataset(_task(256, seed=9)[0]), batch_size=128)
    for data in (_BareTensors(inputs), TensorDataset(inputs)):  # bare tensors and (x,)
        student = _mlp(seed=11, dropout=0.0)
        before = agreement(student, teacher, probe)
        teacher.train()
        result = fit(student, DataLoader(data, batch_size=64), _quiet(epochs=5, lr=1e-2),
                     teacher=teacher)
        after = agreement(student, teacher, probe)
        assert before < 0.5 and after > 0.85, (before, after)
        assert not teacher.training
        assert result.history[-1]["loss"] < result.history[0]["loss"]
        assert all(p.grad is None for p in teacher.parameters())


def test_distill_weight_one_ignores_labels() -> None:
    torch.manual_seed(3)
    teacher = nn.Linear(8, 4)
    inputs, _ = _task(512, seed=5)
    noise = torch.randint(0, 4, (512,), generator=torch.Generator().manual_seed(0))
    student = _mlp(seed=11, dropout=0.0)
    loader = DataLoader(TensorDataset(inputs, noise), batch_size=64)
    fit(student, loader, _quiet(epochs=5, lr=1e-2, distill_weight=1.0), teacher=teacher)
    assert agreement(student, teacher, DataLoader(TensorDataset(inputs), batch_size=256)) > 0.9


def test_unlabelled_data_without_teacher_raises() -> None:
    loader = DataLoader(_BareTensors(_task()[0]), batch_size=32)
    with pytest.raises(ConfigError, match="teacher"):
        fit(_mlp(), loader, _quiet())
    loader = DataLoader(TensorDataset(_task()[0]), batch_size=32)
    with pytest.raises(ConfigError, match="teacher"):
        fit(_mlp(), loader, _quiet())


def test_only_given_parameters_change() -> None:
    model = _mlp()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()
              if not name.startswith("4.")}
    fit(model, _loader(), _quiet(epochs=1), parameters=model[4].parameters())
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
        else:
            assert not torch.equal(p, _mlp()[4].get_parameter(name[2:])), name


def test_grad_clip_bounds_the_update() -> None:
    model = _mlp(dropout=0.0)
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    config = _quiet(optimizer="sgd", lr=0.05, momentum=0.0, schedule="constant",
                    grad_clip=1e-3, max_steps_per_epoch=1)
    fit(model, _loader(), config)
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
    assert 0 < moved.norm() <= 0.05 * 1e-3 * (1 + 1e-5)


# --------------------------------------------------------------------------- schedule and hooks


def test_cosine_schedule_ends_at_min_lr() -> None:
    config = _quiet(epochs=2, lr=1e-2, min_lr=1e-4)
    result = fit(_mlp(), _loader(), config)
    assert result.history[0]["lr"] == pytest.approx((1e-2 + 1e-4) / 2)
    assert result.history[-1]["lr"] == pytest.approx(1e-4)
    constant = fit(_mlp(), _loader(), _quiet(epochs=2, lr=1e-2, schedule="constant"))
    assert [record["lr"] for record in constant.history] == [1e-2, 1e-2]


def test_warmup_is_linear_then_cosine() -> None:
    config = Finetune(lr=1.0, min_lr=0.0, warmup_steps=4)
    rates = [train_module._lr_at(config, step, 14) for step in range(15)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]
    assert rates[4] == 1.0 and rates[9] == pytest.approx(0.5) and rates[14] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(rates[4:]))


def test_hooks_are_called_in_order_with_increasing_steps() -> None:
    hook = _Recorder()
    fit(_mlp(), _loader(), _quiet(epochs=3), hooks=[hook])
    assert hook.of("start") == [-1]
    assert hook.of("before") == list(range(24)) == hook.of("after")
    assert hook.of("epoch") == [0, 1, 2]
    # before/after alternate around each step, and epoch ends follow the epoch's last step
    kinds = [name for name, _ in hook.calls]
    assert kinds[1:4] == ["before", "after", "before"]
    assert hook.calls.index(("epoch", 0)) == hook.calls.index(("after", 7)) + 1


def test_hooks_must_be_step_hooks() -> None:
    with pytest.raises(ConfigError, match="StepHook"):
        fit(_mlp(), _loader(), _quiet(), hooks=[object()])  # type: ignore[list-item]


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_written_atomically_each_epoch(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def recording_replace(src: str, dst: str) -> None:
        replaced.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(train_module.os, "replace", recording_replace)
    directory = tmp_path / "ckpt"
    model = _mlp()
    result = fit(model, _loader(), _quiet(epochs=3, checkpoint_dir=str(directory)))
    assert len(replaced) == 3
    for src, dst in replaced:
        assert Path(src).parent == directory and Path(dst) == directory / CHECKPOINT_NAME
        assert src != dst
    assert sorted(os.listdir(directory)) == [CHECKPOINT_NAME]  # no temp files left
    state = torch.load(directory / CHECKPOINT_NAME, weights_only=True)
    assert state["epochs_done"] == 3 and state["global_step"] == 24
    assert state["history"] == result.history
    for name, tensor in model.state_dict().items():
        assert torch.equal(state["model"][name], tensor), name


def test_failed_checkpoint_write_keeps_previous_and_leaves_no_temp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fit(_mlp(), _loader(), _quiet(epochs=1, checkpoint_dir=str(tmp_path)))
    good = (tmp_path / CHECKPOINT_NAME).read_bytes()

    def torn_save(obj: object, stream: object) -> None:
        stream.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(train_module.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        fit(_mlp(), _loader(), _quiet(epochs=1, checkpoint_dir=str(tmp_path)))
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT_NAME]
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == good


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_after_kill_is_bit_exact(tmp_path: Path, optimizer: str) -> None:
    eval_loader = DataLoader(TensorDataset(*_task(64, seed=7)), batch_size=32)
    settings = {"epochs": 3, "optimizer": optimizer, "lr": 1e-2, "weight_decay": 1e-4,
                "warmup_steps": 3, "grad_clip": 5.0, "bn_recalibration_batches": 2}

    reference = _mlp()
    full = fit(reference, _loader(), _quiet(**settings), eval_loader=eval_loader)

    directory = str(tmp_path / "run")
    crashed = _mlp()
    with pytest.raises(_Killed):  # killed in the middle of epoch 3 (steps 16..23)
        fit(crashed, _loader(), _quiet(checkpoint_dir=directory, **settings),
            eval_loader=eval_loader, hooks=[_Crash(at_step=19)])
    assert torch.load(Path(directory) / CHECKPOINT_NAME, weights_only=True)["epochs_done"] == 2

    resumed_model, hook = _mlp(seed=99), _Recorder()  # different init: must come from the file
    resumed = fit(resumed_model, _loader(seed=0), _quiet(checkpoint_dir=directory, resume=True,
                                                         **settings),
                  eval_loader=eval_loader, hooks=[hook])
    assert resumed.resumed_from == 2
    assert hook.of("before") == list(range(16, 24)) and hook.of("epoch") == [2]
    assert resumed.history == full.history
    expected = reference.state_dict()
    assert resumed_model.state_dict().keys() == expected.keys()
    for name, tensor in resumed_model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_resume_of_finished_run_trains_nothing(tmp_path: Path) -> None:
    config = _quiet(epochs=2, checkpoint_dir=tmp_path)  # a Path works too
    first = _mlp()
    done = fit(first, _loader(), config)
    hook, again = _Recorder(), _mlp(seed=5)
    result = fit(again, _loader(), _quiet(epochs=2, checkpoint_dir=tmp_path, resume=True),
                 hooks=[hook])
    assert result.resumed_from == 2 and result.history == done.history
    assert hook.of("before") == []
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, first.state_dict()[name]), name


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="netshrink.train"):
        result = fit(_mlp(), _loader(),
                     _quiet(epochs=1, checkpoint_dir=str(tmp_path / "new"), resume=True))
    assert result.resumed_from is None and len(result.history) == 1
    assert any("starting fresh" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "new" / CHECKPOINT_NAME).is_file()


def test_existing_checkpoint_without_resume_warns_and_overwrites(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fit(_mlp(), _loader(), _quiet(epochs=2, checkpoint_dir=str(tmp_path)))
    with caplog.at_level(logging.WARNING, logger="netshrink.train"):
        result = fit(_mlp(), _loader(), _quiet(epochs=1, checkpoint_dir=str(tmp_path)))
    assert result.resumed_from is None
    assert any(r.levelno == logging.WARNING and "overwritten" in r.getMessage()
               for r in caplog.records)
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["epochs_done"] == 1


# --------------------------------------------------------------------------- BatchNorm


def test_recalibrate_batchnorm_matches_data_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(240, 3, generator=gen) * torch.tensor([2.0, 0.5, 1.0]) + torch.tensor(
        [3.0, -1.0, 0.0])
    model = nn.Sequential(nn.BatchNorm1d(3, momentum=0.3), nn.Dropout(0.5), nn.Linear(3, 2))
    model.eval()
    loader = DataLoader(_BareTensors(data), batch_size=60)  # 4 equal batches, unlabelled
    recalibrate_batchnorm(model, loader, batches=4)
    norm = model[0]
    assert torch.allclose(norm.running_mean, data.mean(0), atol=1e-5)
    batch_vars = torch.stack([chunk.var(0) for chunk in data.split(60)])
    assert torch.allclose(norm.running_var, batch_vars.mean(0), atol=1e-5)
    assert int(norm.num_batches_tracked) == 4
    assert norm.momentum == 0.3 and not model.training and not model[1].training


def test_fit_recalibrates_batchnorm_after_training() -> None:
    model = _mlp()
    fit(model, _loader(), _quiet(epochs=1, bn_recalibration_batches=3))
    assert int(model[1].num_batches_tracked) == 3  # reset, then exactly 3 batches
    assert model[1].momentum == 0.1


# --------------------------------------------------------------------------- metrics


class _Scale(nn.Module):
    """Logits = factor * x (no parameters: exercises the device fallback)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * x


def test_evaluate_and_agreement_known_values() -> None:
    inputs = torch.eye(4)  # argmax of row i is i
    labels = torch.tensor([0, 1, 2, 0])  # 3 of 4 correct
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=2)
    model = nn.Sequential(_Scale(1.0))
    model.train()
    assert evaluate(model, loader) == 0.75
    assert model.training and model[0].training  # mode restored
    assert evaluate(model, loader, max_batches=1) == 1.0
    flipped = torch.eye(4)[[0, 1, 3, 2]]
    reference = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        reference.weight.copy_(flipped)  # swaps classes 2 and 3
    assert agreement(model, reference, DataLoader(_BareTensors(inputs), batch_size=3)) == 0.5
    assert agreement(model, _Scale(2.0), loader, max_batches=1) == 1.0
    soft = DataLoader(TensorDataset(inputs, torch.eye(4)), batch_size=4)
    assert evaluate(model, soft) == 1.0
    with pytest.raises(ConfigError, match="agreement"):
        evaluate(model, DataLoader(_BareTensors(inputs), batch_size=2))


def test_evaluate_runs_without_gradients() -> None:
    """As its docstring says: no autograd graph is built (SMH's cached expansion and memory
    on large models depend on it)."""
    seen = []
    model = nn.Linear(4, 4)
    model.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    loader = DataLoader(TensorDataset(torch.eye(4), torch.arange(4)), batch_size=2)
    evaluate(model, loader)
    assert seen == [False, False]


def test_distillation_loss_values() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    assert distillation_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    temperature = 3.0
    p = torch.softmax(teacher / temperature, -1)
    q = torch.softmax(student / temperature, -1)
    manual = (p * (p.log() - q.log())).sum(-1).mean() * temperature**2
    assert distillation_loss(student, teacher, temperature).item() == pytest.approx(manual.item())
    assert distillation_loss(student, teacher, 1.0).item() > 0
    with pytest.raises(ConfigError):
        distillation_loss(student, teacher[:, :2], 1.0)
    with pytest.raises(ConfigError):
        distillation_loss(student, teacher, 0.0)
    assert math.isfinite(distillation_loss(student * 1e4, teacher, 1.0).item())


# --------------------------------------------------------------------------- distributed


def _distributed_worker(rank: int, world: int, store: str, out: str) -> None:
    """One rank of a 2-process gloo run (spawned by the test below)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = _mlp()
        result = fit(model, _loader(), _quiet(epochs=2, lr=1e-2, checkpoint_dir=f"{out}/ckpt"))
        torch.save({"model": model.state_dict(), "history": result.history},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_two_ranks_agree(tmp_path: Path) -> None:
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert first["history"] == second["history"]  # metrics were all-reduced
    assert first["history"][-1]["loss"] < first["history"][0]["loss"]
    for name, tensor in first["model"].items():
        assert not name.startswith("module."), name  # the DDP wrapper never leaks out
        assert torch.equal(tensor, second["model"][name]), name
    assert sorted(os.listdir(tmp_path / "ckpt")) == [CHECKPOINT_NAME]
    state = torch.load(tmp_path / "ckpt" / CHECKPOINT_NAME, weights_only=True)
    assert state["epochs_done"] == 2 and state["global_step"] == 2 * 4  # 128 samples per rank
