"""DDP, torch.compile and gradient accumulation together, on the CPU (gloo, inductor): the setting of a
real multi-GPU run, where each of these has been tested alone (tests/test_train.py) but not all three.

Compiled under DDP, Dynamo's DDPOptimizer splits the graph at DDP's gradient buckets, so that each
bucket's all-reduce can start while the backward of the earlier layers still runs; no_sync() must
then still hold back every all-reduce but the last micro-step's. The tiny model is split too: its
tied embedding (50304 x 32 floats, 6.4 MB) fills DDP's first bucket (1 MiB cap) alone."""
import os
import subprocess
import sys

import pytest
import torch

import train_gpt2 as tg
from conftest import ROOT, train_losses, write_shards

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "16", "--batch-size", "2",
        "--no-hellaswag", "--num-samples", "0", "--eval-every", "0", "--val-tokens", "64", "--seed", "7"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")), [400, 300, 250, 350])


def test_compiled_ddp_with_accumulation_matches_one_compiled_process(shards, tmp_path):
    # 2 ranks x 2 micro-steps (the first under no_sync), compiled, against 1 compiled process x 4 micro-steps
    common = [*TINY, "--data", shards, "--max-steps", "4", "--warmup-steps", "2", "--total-batch-size", "128",
              "--compile"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_LOGS": "ddp_graphs"}  # prints the split graph
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train_gpt2.py"), *common, "--log-dir", str(tmp_path / "ddp")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x 2 rank(s) x 2 accumulation step(s)" in proc.stdout and "compile on" in proc.stdout
    # each rank's training graph was split at the bucket boundary (one split graph each), into 2 parts
    assert proc.stderr.count("---split graph---") >= 2 and "---submod_1 graph---" in proc.stderr, proc.stderr[-3000:]
    try:
        assert tg.main([*common, "--log-dir", str(tmp_path / "one")]) == 0
    finally:
        torch._dynamo.reset()  # later tests in this process compile afresh
    ddp, one = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "one")
    assert sorted(ddp) == sorted(one) == list(range(4))
    for step in one:  # the same sums in another order: float32 rounding apart (measured: ~1e-7)
        assert ddp[step] == pytest.approx(one[step], rel=1e-5)
    p_ddp = torch.load(tmp_path / "ddp" / "ckpt_000004.pt", weights_only=True)["model"]
    p_one = torch.load(tmp_path / "one" / "ckpt_000004.pt", weights_only=True)["model"]
    for k in p_one:
        a, b = p_ddp[k], p_one[k]
        if k.endswith("attn.c_attn.bias"):  # the key bias: rounding noise only (see test_train.py)
            C = len(b) // 3
            assert a[C:2 * C].abs().max() < 1e-5 and b[C:2 * C].abs().max() < 1e-5
            a, b = torch.cat([a[:C], a[2 * C:]]), torch.cat([b[:C], b[2 * C:]])
        assert torch.linalg.norm(a - b) <= 1e-5 * torch.linalg.norm(b), k
