"""A fine-tune killed hard (SIGKILL) mid-epoch resumes from its last checkpoint and ends
with exactly the model an uninterrupted run gives (same .nsk bytes)."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from torch import nn
    import netshrink
    import netshrink.train.loop as loop

    ckpt, out, resume, kill_at = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    train_step = loop._train_step

    def killing_step(run, batch):  # SIGKILL before the optimizer step numbered kill_at
        if run.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(run, batch)

    loop._train_step = killing_step
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 10)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 1, 10, 10, generator=g)
    y = torch.randint(0, 10, (96,), generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    ft = netshrink.Finetune(epochs=3, checkpoint_dir=ckpt, resume=resume, progress=False)
    small = netshrink.compress(model, target="2bit", data=data, finetune=ft, min_weights=100)
    netshrink.save(small, out)
""")


def _run(tmp_path, ckpt, out, resume, kill_at):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), str(ckpt), str(out), str(int(resume)),
                           str(kill_at)], capture_output=True, text=True, timeout=300)


def test_killed_finetune_resumes_exactly(tmp_path):
    ref = _run(tmp_path, tmp_path / "ref_ckpt", tmp_path / "ref.nsk", False, -1)
    assert ref.returncode == 0, ref.stderr
    # 6 steps per epoch: step 14 is in the middle of the third epoch
    killed = _run(tmp_path, tmp_path / "ckpt", tmp_path / "out.nsk", False, 14)
    assert killed.returncode == -9
    assert (tmp_path / "ckpt" / "checkpoint.pt").is_file()
    assert not (tmp_path / "out.nsk").exists()
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    # kill at step 5: a run that started over (instead of resuming after epoch 2,
    # at step 12) would die there
    resumed = _run(tmp_path, tmp_path / "ckpt", tmp_path / "out.nsk", True, 5)
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "out.nsk").read_bytes() == (tmp_path / "ref.nsk").read_bytes()
