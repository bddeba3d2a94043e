"""bench.py runs (tiny model, CPU), the training step it times never waits for the device, and the
loss-only training forward (model(x, y, return_logits=False)) changes memory, not numbers."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
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


# ---------------------------------------------------------------- the loss-only training forward

# a small model whose vocabulary is padded (50257 real tokens, 50304 rows), as in training
SMALL = GPTConfig(block_size=16, vocab_size=50257, padded_vocab_size=50304, n_layer=1, n_head=2, n_embd=16)


def small_batch():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 50257, (2, 16), generator=g), torch.randint(0, 50257, (2, 16), generator=g)
    y[0, 3] = -1  # an ignored target too
    return x, y


def loss_and_grads(model, params, x, y, **kwargs):
    for p in params.values():
        p.grad = None
    _, loss = model(x, y, **kwargs)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in params.items()}


@pytest.mark.usefixtures("one_torch_thread")
def test_loss_only_forward_gives_the_same_loss_and_gradients_bit_for_bit():
    torch.manual_seed(0)
    raw = GPT(SMALL)
    params = dict(raw.named_parameters())
    x, y = small_batch()
    compiled = torch.compile(raw)
    try:
        for model in (raw, compiled):  # eager, then inductor: each mode against itself
            full_loss, full_grads = loss_and_grads(model, params, x, y)  # logits returned, as before
            loss, grads = loss_and_grads(model, params, x, y, return_logits=False)
            assert torch.equal(loss, full_loss)
            for name in params:
                assert torch.equal(grads[name], full_grads[name]), name
            assert model(x, y, return_logits=False)[0] is None
    finally:
        torch._dynamo.reset()


@pytest.mark.usefixtures("one_torch_thread")
def test_compiled_loss_only_backward_gets_no_logits_gradient():
    """Why the loss-only forward saves memory once compiled: AOTAutograd gives the backward graph one
    incoming gradient ("tangent") per output of the forward that requires grad, and fills it with
    zeros when the caller never uses that output. Returned logits get a (B, T, vocab) one every
    micro-step; the loss-only graph gets only the loss's scalar."""
    torch.manual_seed(0)
    raw = GPT(SMALL)
    x, y = small_batch()

    def tangent_shapes(**kwargs):
        shapes = []

        def backward_compiler(gm, example_inputs):
            shapes.extend(tuple(n.meta["val"].shape) for n in gm.graph.nodes
                          if n.op == "placeholder" and n.name.startswith("tangents"))
            return make_boxed_func(gm.forward)

        torch._dynamo.reset()
        backend = aot_autograd(fw_compiler=lambda gm, example_inputs: make_boxed_func(gm.forward),
                               bw_compiler=backward_compiler)  # AOTAutograd's graphs, run as they are
        _, loss = torch.compile(raw, backend=backend)(x, y, **kwargs)
        loss.backward()
        return shapes

    try:
        assert tangent_shapes() == [(2, 16, 50257), ()]  # the previous forward: logits, then the loss
        assert tangent_shapes(return_logits=False) == [()]
    finally:
        torch._dynamo.reset()


def test_bench_measures_the_memory_the_loss_only_forward_saves():
    """bench.py's variants with the previous forward (-logits) hold the logits, B x T x 50304 float32
    values (padded: the real vocabulary is a view of them), through the backward: eager in
    train_step's `_`; compiled as a graph output, plus the zero gradient AOTAutograd makes for it."""
    B, T = 8, 64
    logits_gib = B * T * 50304 * 4 / 2**30  # 0.096 GiB
    variants = "eager,eager-logits,compile,compile-logits"
    out = subprocess.run([sys.executable, "bench.py", "--tiny", "--variants", variants, "--total-batch-size",
                          str(B * T), "--steps", "1", "--warmup", "1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    header = next(line for line in out.stdout.splitlines() if line.startswith("| variant |"))
    column = [c.strip() for c in header.split("|")].index("step memory")
    step_gib = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > column and cells[column].endswith(" GiB"):
            step_gib[cells[1]] = float(cells[column].removesuffix(" GiB"))
    assert sorted(step_gib) == ["compile", "compile-logits", "eager", "eager-logits"], out.stdout
    # eager: the same step plus exactly one logits tensor (the column has 0.001 GiB steps)
    assert step_gib["eager-logits"] - step_gib["eager"] == pytest.approx(logits_gib, abs=0.002)
    # compiled: the logits output and its zero gradient (two tensors at most; measured 1.8)
    assert logits_gib - 0.002 <= step_gib["compile-logits"] - step_gib["compile"] <= 2 * logits_gib + 0.002
