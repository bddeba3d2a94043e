"""On a CUDA machine: what the CPU suite cannot show. Run with `python -m pytest -m gpu tests/test_gpu.py -s`
(gpu_check.sh does, then bench.py); deselected by default (pytest.ini), skipped where there is no GPU.

- bf16 autocast + torch.compile training on CUDA tracks float32 eager training on the CPU;
- the 124M step at micro-batch 64 x 1024: compiled, no host-device sync, fused AdamW, flash (or
  cuDNN) attention, and its peak memory (printed) under 80 GB; micro-batch 32 under 40 GB;
- HellaSwag scores and KV-cache greedy generation on CUDA give the CPU's answers;
- a checkpoint written on CUDA resumes on the CPU, and the other way round;
- 2 processes sharing one GPU (DDP over gloo) equal 1 process with twice the accumulation;
- train_gpt2.py end to end on CUDA (evals, HellaSwag, samples, checkpoints), then --resume auto.

Models are tiny, except the 124M memory test, so that the whole file runs in a few minutes."""
import copy
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import hellaswag
import train_gpt2 as tg
from conftest import ROOT, read_log, train_losses, write_hellaswag
from model import GPT, GPTConfig, config_for
from train_gpt2 import DataLoader, train_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

CUDA = "cuda"
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "16", "--batch-size", "2",
        "--total-batch-size", "64", "--no-hellaswag", "--num-samples", "0", "--eval-every", "0",
        "--val-tokens", "64", "--seed", "7"]


@pytest.fixture(autouse=True)
def fresh_state():
    """train() turns TF32 on for the process, compiled graphs stay cached: each test starts clean."""
    precision = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(precision)
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def markov_tokens(n, seed=0, states=512, successors=4):
    """n tokens (uint16) of a random Markov chain: each of `states` token ids is followed by one of
    its 4 successors, so a model can learn it (loss from ln(50257) = 10.8 towards ln 4 = 1.4)."""
    rng = np.random.default_rng(seed)
    table, choice = rng.integers(0, states, (states, successors)), rng.integers(0, successors, n)
    out, t = np.empty(n, dtype=np.uint16), 0
    for i in range(n):
        t = table[t, choice[i]]
        out[i] = t
    return out


@pytest.fixture(scope="module")
def markov_shards(tmp_path_factory):
    """fineweb.py-style shards (1 val, 2 train) of Markov tokens."""
    d = tmp_path_factory.mktemp("markov")
    for i in range(3):
        np.save(d / f"edufineweb_{'val' if i == 0 else 'train'}_{i:06d}.npy", markov_tokens(20_000, seed=i))
    return str(d)


def val_losses(log_dir):
    return {r["step"]: r["val_loss"] for r in read_log(log_dir) if "val_loss" in r}


def run_main(argv, capsys):
    code = tg.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, out[-3000:] + err[-3000:]
    return out


# ---------------------------------------------------------------- bf16 + compile on CUDA vs float32 on CPU


def test_bf16_compiled_training_on_cuda_tracks_float32_eager_on_cpu():
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=128, padded_vocab_size=50304)
    cpu_model = GPT(config)
    cuda_model = copy.deepcopy(cpu_model).to(CUDA)  # the same weights (deepcopy keeps wte and lm_head tied)
    tokens = markov_tokens(100_000)
    lr, accum = 3e-3, 2
    runs = []
    for model, device, dtype in ((cpu_model, "cpu", None), (cuda_model, CUDA, torch.bfloat16)):
        torch.set_float32_matmul_precision("high" if device == CUDA else "highest")  # as train_gpt2.py
        optimizer = model.configure_optimizers(0.1, lr, device, verbose=False)  # fused on CUDA
        compiled = torch.compile(model) if device == CUDA else model
        loader = DataLoader([("markov", tokens)], 8, 64, grad_accum_steps=accum, shuffle=False, device=device)
        runs.append([train_step(compiled, optimizer, loader, accum, lr, 1.0, dtype)[0].item() for _ in range(20)])
    cpu, cuda = runs
    print(f"\nfloat32 eager CPU: {' '.join(f'{v:.4f}' for v in cpu)}\nbf16 compiled CUDA: "
          f"{' '.join(f'{v:.4f}' for v in cuda)}")
    assert cpu[0] > 10.5 and cpu[-1] < cpu[0] - 3  # it learns: the comparison is not of two flat lines
    # bf16 keeps 8 bits of mantissa (0.4%); the loss averages 1024 tokens. Step 0 runs the same weights on
    # the same batch; later steps compound the differences through AdamW (a CPU bf16 run differs by 4e-4).
    assert cuda[0] == pytest.approx(cpu[0], rel=5e-3)
    for step, (a, b) in enumerate(zip(cpu, cuda)):
        assert b == pytest.approx(a, rel=2e-2), f"step {step}"


# ---------------------------------------------------------------- the 124M step


def compiled_124m_step(batch_size, seq_len=1024, accum=2, shape=None):
    """A warmed-up compiled 124M training step at micro-batch batch_size, as train_gpt2.py runs it on
    CUDA (bf16 autocast, TF32, fused AdamW, padded vocabulary): (step function, optimizer)."""
    torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    raw = GPT(config_for("gpt2", block_size=seq_len, padded_vocab_size=50304, **(shape or {}))).to(CUDA)
    optimizer = raw.configure_optimizers(0.1, 6e-4, CUDA, verbose=False)
    model = torch.compile(raw)
    tokens = np.random.default_rng(0).integers(0, 50257, 4 * batch_size * seq_len * accum + 1, dtype=np.uint16)
    loader = DataLoader([("random", tokens)], batch_size, seq_len, grad_accum_steps=accum, shuffle=False, device=CUDA)

    def step():
        return train_step(model, optimizer, loader, accum, 6e-4, 1.0, torch.bfloat16)

    for _ in range(2):  # compile, then a step with the optimizer state in place
        step()
    torch.cuda.synchronize()
    return step, optimizer


@pytest.mark.parametrize("batch_size, limit_gb", [(64, 80), (32, 40)])
def test_124m_compiled_step_no_sync_fused_adamw_flash_attention_and_memory(batch_size, limit_gb, record_property):
    step, optimizer = compiled_124m_step(batch_size)
    assert optimizer.defaults["fused"] is True  # one kernel for all parameters' update

    # a step that waits for the GPU anywhere (.item(), a device-to-host copy, a synchronize) raises here
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, norm = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    assert torch.isfinite(loss) and torch.isfinite(norm)

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    attention = sorted({n for n in names if n.startswith("aten::_scaled_dot_product")})
    assert attention and all("flash" in n or "cudnn" in n for n in attention), attention  # not efficient/math
    assert any(n.endswith("_backward") for n in attention), attention  # the backward too
    kernels = [n for n in names if not n.startswith("aten::") and ("flash" in n.lower() or "cudnn" in n.lower())]
    assert kernels, "no flash or cuDNN attention kernel ran on the GPU"
    assert "aten::_fused_adamw_" in names

    print(f"\n124M step, micro-batch {batch_size} x 1024, accumulation 2: peak memory allocated "
          f"{peak / 2**30:.1f} GiB ({peak / 1e9:.1f} GB), reserved {reserved / 2**30:.1f} GiB; attention ops "
          f"{attention}; kernels e.g. {kernels[0][:80]}")
    record_property(f"peak_memory_gib_B{batch_size}", round(peak / 2**30, 2))
    assert peak < limit_gb * 1e9, f"{peak / 1e9:.1f} GB allocated at micro-batch {batch_size}"


# ---------------------------------------------------------------- evaluation and sampling: CUDA = CPU

WORDS = ("the a man woman dog child ball park kitchen knife onion guitar river boat rope hat shoes runs jumps "
         "cuts plays sits waves smiles throws paddles ties slowly quickly then again red blue and with into over "
         "under while he she they it is are").split()


def hellaswag_examples(n=24, seed=0):
    """Examples in HellaSwag's schema (as tests/test_hellaswag.py builds them): contexts of 2 to 14
    words, endings of 1 to 10, and a context longer than the block size (truncated)."""
    rng = random.Random(seed)

    def sentence(lo, hi):
        return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi))).capitalize() + rng.choice([".", "!", ",", ""])

    examples = [dict(ctx=sentence(2, 14), endings=[sentence(1, 10) for _ in range(4)], label=rng.randrange(4))
                for _ in range(n)]
    examples.append(dict(ctx=" ".join(rng.choices(WORDS, k=90)), endings=["He waves.", "It is red.", "Then", "ok"],
                         label=1))
    return examples


def tiny_random_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=48, n_layer=2, n_head=2, n_embd=32))


def second_gap(scores):
    """Per row, how far the best (lowest) score is from the runner-up."""
    top2 = scores.topk(2, dim=1, largest=False).values
    return top2[:, 1] - top2[:, 0]


def test_hellaswag_on_cuda_gives_the_cpu_predictions():
    torch.set_float32_matmul_precision("highest")  # float32 matmuls on both devices (no TF32)
    model, examples = tiny_random_model(), hellaswag_examples()
    summed_cpu, mean_cpu = hellaswag.score_examples(model, examples, "cpu", batch_size=8)
    cpu = hellaswag.evaluate(model, examples, "cpu", batch_size=8, return_predictions=True)
    cuda_model = copy.deepcopy(model).to(CUDA)
    summed_cuda, mean_cuda = hellaswag.score_examples(cuda_model, examples, CUDA, batch_size=8)
    cuda = hellaswag.evaluate(cuda_model, examples, CUDA, batch_size=8, return_predictions=True)
    # a prediction may only flip where two endings tie to rounding: none does here (else: another seed)
    assert min(second_gap(summed_cpu).min(), second_gap(mean_cpu).min()) > 1e-4
    torch.testing.assert_close(summed_cuda, summed_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean_cuda, mean_cpu, rtol=1e-5, atol=1e-5)
    assert cuda["predictions"] == cpu["predictions"] and len(cpu["predictions"]) == len(examples)
    assert (cuda["acc"], cuda["acc_norm"]) == (cpu["acc"], cpu["acc_norm"])


def test_kv_cache_greedy_generation_on_cuda_equals_cpu_greedy():
    torch.set_float32_matmul_precision("highest")
    model = tiny_random_model(seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # (tied with wte) spread the logits, so that no two come close
    prompt = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    new = 60  # 12 + 60 > block_size 48: the window slides, and the cache is rebuilt
    cpu = model.generate(prompt, new, temperature=0, use_cache=False)  # the plain forward, every step
    cuda = copy.deepcopy(model).to(CUDA).generate(prompt.to(CUDA), new, temperature=0).cpu()  # KV cache
    # greedy picks could only differ where the top two logits tie to rounding: check none does
    with torch.no_grad():
        for t in range(prompt.size(1), prompt.size(1) + new):
            window = cpu[:, max(0, t - 48) : t]
            logits = model.logits(model.hidden_states(window)[0][:, -1])
            assert torch.equal(logits.argmax(-1), cpu[:, t])
            assert second_gap(-logits).min() > 1e-3, f"near-tie at position {t}"
    assert torch.equal(cuda, cpu)


# ---------------------------------------------------------------- checkpoints move between devices


@pytest.mark.parametrize("first, then", [(CUDA, "cpu"), ("cpu", CUDA)])
def test_a_checkpoint_resumes_on_the_other_device(first, then, markov_shards, tmp_path, capsys):
    common = [*TINY, "--data", markov_shards, "--dtype", "float32", "--no-compile", "--warmup-steps", "0",
              "--lr", "3e-3", "--eval-every", "2", "--checkpoint-every", "2"]
    run_main([*common, "--device", first, "--max-steps", "2", "--log-dir", str(tmp_path / "run")], capsys)
    saved_val = val_losses(tmp_path / "run")[2]  # the weights it saved, evaluated on the first device
    out = run_main([*common, "--device", then, "--max-steps", "4", "--resume", "auto",
                    "--log-dir", str(tmp_path / "run")], capsys)
    assert f"resumed from {tmp_path / 'run' / 'ckpt_000002.pt'} at step 2" in out and f"device: {then}" in out
    run_main([*common, "--device", "cpu", "--max-steps", "4", "--log-dir", str(tmp_path / "ref")], capsys)
    losses, reference = train_losses(tmp_path / "run"), train_losses(tmp_path / "ref")
    assert sorted(losses) == list(range(4))
    # the CUDA half multiplies in TF32 (train_gpt2.py turns it on): close to the CPU, not equal. The
    # exact resume is tests/test_train.py's; here: the state arrives whole, on the other device
    for step in reference:
        assert losses[step] == pytest.approx(reference[step], rel=1e-2), step
    # the resumed run evaluates the weights it loaded first (step 2): the saved weights, whole
    assert val_losses(tmp_path / "run")[2] == pytest.approx(saved_val, rel=1e-3)
    ckpt = torch.load(tmp_path / "run" / "ckpt_000004.pt", weights_only=True)
    assert ckpt["step"] == 4
    assert all(float(s["step"]) == 4 for s in ckpt["optimizer"]["state"].values())  # AdamW continued, not restarted


# ---------------------------------------------------------------- two processes on one GPU

# Two ranks cannot share a GPU under NCCL ("Duplicate GPU detected"), and setup_distributed gives rank r
# cuda:r (cuda:1 does not exist here). gloo all-reduces CUDA tensors (through host memory), so this
# wrapper puts both ranks on cuda:0 over gloo. TF32 stays off, so that both runs differ only by the
# order of float32 sums, as on the CPU (tests/test_train.py), and the same tolerance applies.
ONE_GPU_WRAPPER = """
import os, sys
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
import train_gpt2

def one_gpu_gloo(device_arg):
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), device

train_gpt2.setup_distributed = one_gpu_gloo
torch.set_float32_matmul_precision = lambda precision: None  # train() would turn TF32 on
sys.exit(train_gpt2.main(sys.argv[1:]))
"""


def test_two_processes_on_one_gpu_match_one_process_with_twice_the_accumulation(markov_shards, tmp_path):
    wrapper = tmp_path / "one_gpu.py"
    wrapper.write_text(ONE_GPU_WRAPPER.format(root=ROOT))
    common = [*TINY, "--data", markov_shards, "--max-steps", "6", "--warmup-steps", "2", "--total-batch-size", "128",
              "--dtype", "float32", "--no-compile"]
    # gloo over the loopback interface: both ranks are on this machine, whatever its hostname resolves to
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    runs = {"ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper)],
            "one": [sys.executable, str(wrapper)]}
    for name, cmd in runs.items():
        proc = subprocess.run([*cmd, *common, "--log-dir", str(tmp_path / name)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "device: cuda:0" in proc.stdout
        assert ("x 2 rank(s) x 2 accumulation" if name == "ddp" else "x 1 rank(s) x 4 accumulation") in proc.stdout
    ddp, one = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "one")
    assert sorted(ddp) == sorted(one) == list(range(6))
    for step in one:
        assert ddp[step] == pytest.approx(one[step], rel=1e-5)
    p_ddp = torch.load(tmp_path / "ddp" / "ckpt_000006.pt", weights_only=True)["model"]
    p_one = torch.load(tmp_path / "one" / "ckpt_000006.pt", weights_only=True)["model"]
    for k in p_one:
        a, b = p_ddp[k], p_one[k]
        if k.endswith("attn.c_attn.bias"):  # the key bias gets a zero gradient: noise only (test_train.py)
            C = len(b) // 3
            assert a[C:2 * C].abs().max() < 1e-5 and b[C:2 * C].abs().max() < 1e-5
            a, b = torch.cat([a[:C], a[2 * C:]]), torch.cat([b[:C], b[2 * C:]])
        assert torch.linalg.norm(a - b) <= 1e-5 * torch.linalg.norm(b), k


# ---------------------------------------------------------------- train_gpt2.py end to end on CUDA


def test_train_gpt2_end_to_end_on_cuda_then_resume(markov_shards, tmp_path):
    """The defaults on CUDA (compile, bf16 autocast, fused AdamW), evals, HellaSwag, samples and
    checkpoints, as a user runs it; then --resume auto continues from the checkpoint. Resuming is
    not bit-exact on a GPU (kernels may sum in any order), so losses compare with a tolerance."""
    hs = write_hellaswag(tmp_path / "hs.jsonl")
    common = [*TINY, "--data", markov_shards, "--device", CUDA, "--warmup-steps", "1", "--lr", "3e-3",
              "--eval-every", "2", "--hellaswag", "--hellaswag-file", hs, "--num-samples", "2", "--sample-every", "2",
              "--checkpoint-every", "2"]

    def train(log_dir, *extra):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt2.py"), *common, "--log-dir",
                               str(tmp_path / log_dir), *extra], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    whole = train("whole", "--max-steps", "6")
    assert "device: cuda:0, autocast torch.bfloat16, compile on" in whole
    assert "rank 0 sample 0: Hello, I'm a language model," in whole and "hellaswag acc_norm" in whole
    train("resumed", "--max-steps", "4")
    out = train("resumed", "--max-steps", "6", "--resume", "auto")
    assert f"resumed from {tmp_path / 'resumed' / 'ckpt_000004.pt'} at step 4" in out
    a, b = read_log(tmp_path / "whole"), read_log(tmp_path / "resumed")
    assert [(r["step"], sorted(r)) for r in a] == [(r["step"], sorted(r)) for r in b]  # each record once, in order
    assert [r["step"] for r in a if "hellaswag" in r] == [0, 2, 4, 6]
    steps = [r for r in a if "train_loss" in r]
    assert [r["step"] for r in steps] == list(range(6)) and all(0 < r["mfu"] < 1 for r in steps)
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-2), (ra["step"], key)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("ckpt_*.pt")) == \
        ["ckpt_000002.pt", "ckpt_000004.pt", "ckpt_000006.pt"]
