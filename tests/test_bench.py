"""bench.py runs (tiny model, CPU), and the training step it times never waits for the device."""
import os
import subprocess
import sys

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT
from model import GPT, GPTConfig
from train_gpt2 import DataLoader, train_step


class ScalarReads(TorchDispatchMode):
    """Records every read of a tensor's value by the host (.item(), float(t), bool(t), ...): they
    all go through aten._local_scalar_dense, which on a GPU waits for the device to catch up."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(args[0])
        return func(*args, **(kwargs or {}))


def test_train_step_reads_no_device_values():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    optimizer = model.configure_optimizers(0.1, 1e-3, "cpu", verbose=False)
    tokens = np.random.default_rng(0).integers(0, 50257, 4000, dtype=np.uint16)
    loader = DataLoader([("synthetic", tokens)], 2, 16, grad_accum_steps=2, shuffle=False)
    train_step(model, optimizer, loader, 2, 1e-3)  # creates the optimizer state
    step_counters = {id(s["step"]) for s in optimizer.state.values()}
    with ScalarReads() as spy:
        loss, norm = train_step(model, optimizer, loader, 2, 1e-3)
    assert isinstance(loss, torch.Tensor) and isinstance(norm, torch.Tensor)  # returned, not read
    # The only reads allowed: AdamW's step counters (host tensors unless fused, which is what CUDA
    # uses) and the model's token-id range check, which runs on CPU inputs only (int64 min/max).
    unexpected = [t for t in spy.reads if id(t) not in step_counters and t.dtype != torch.int64]
    assert unexpected == [], f"the step reads values of {[(t.dtype, tuple(t.shape)) for t in unexpected]}"
    assert len(spy.reads) > 0  # the spy does see reads (the counters): it would see a loss.item()


def test_bench_tiny_runs_on_cpu():
    # --tiny's defaults are micro-batch 8 x 2 steps of accumulation; an explicit --batch-size wins
    out = subprocess.run([sys.executable, "bench.py", "--tiny", "--variants", "eager", "--steps", "1",
                          "--warmup", "1", "--batch-size", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "T=64, 1,024 tokens per step" in out.stdout
    row = [line for line in out.stdout.splitlines() if line.startswith("| eager |")]
    assert len(row) == 1 and "| 4 x 4 |" in row[0], out.stdout
    tok_per_s = float(row[0].split("|")[4].replace(",", ""))
    assert tok_per_s > 0


def test_bad_flags_are_usage_errors(capsys):
    import bench

    for argv, flag in ((["--steps", "0"], "--steps"), (["--variants", "eager,fast"], "--variants"),
                       (["--batch-size", "-1"], "--batch-size"),
                       *([(["--device", "cuda"], "--device cuda: no CUDA device")] if not torch.cuda.is_available() else [])):
        try:
            bench.main(argv)
        except SystemExit as e:
            message = str(e.code) if not isinstance(e.code, int) else capsys.readouterr().err
            assert flag in message, message
        else:
            raise AssertionError(f"{argv} was accepted")
