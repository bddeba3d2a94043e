"""Time train_gpt2.py's real training step (forward, backward, clip, AdamW) on synthetic tokens.

Everything timed is imported from train_gpt2.py and model.py: the model, the optimizer, autocast,
torch.compile and the data loader (fed an in-memory random shard, so its pinned host-to-device copy
is timed too). Each variant changes one thing from `compile`, and the table ends with ms/step,
tokens/s, MFU, peak memory, the memory one step allocates, and whether the step waits for the GPU.

    python bench.py                       # on a GPU: the 124M recipe, every variant below
    python bench.py --variants eager,compile --steps 5
    python bench.py --tiny                # a tiny model on the CPU, for CI (no MFU on a CPU)
    python bench.py --variants eager,eager-logits,compile,compile-logits --batch-size 8 --seq-len 256 \
        --total-batch-size 2048 --warmup 1 --steps 1    # CPU: what the loss-only forward saves
"""
import argparse
import contextlib
import gc
import json
import os
import tempfile
import time

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import utils
from model import GPT, H100_BF16_PEAK_FLOPS, GPTConfig
from train_gpt2 import DataLoader, train_step

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
# name -> changes from the default: compiled, micro-batch 64, PyTorch's choice of attention, vocab 50304,
# the loss-only training forward
VARIANTS = {
    "eager": dict(compile=None),  # the walkthrough's final setting (it had to turn compile off)
    "eager-logits": dict(compile=None, logits=True),
    "compile": dict(),
    # the previous forward, which returned the (B, T, vocab) logits in training too: see PreviousForward
    "compile-logits": dict(logits=True),
    # autotuned kernels, without CUDA graphs: replaying a graph across the micro-steps of gradient
    # accumulation is a known source of errors and wrong gradients (pytorch#96693, #169545)
    "compile-max-autotune": dict(compile="max-autotune-no-cudagraphs"),
    "compile-B16": dict(batch_size=16),
    "compile-B32": dict(batch_size=32),
    "compile-flash": dict(backend="flash"),
    "compile-cudnn": dict(backend="cudnn"),
    "compile-efficient": dict(backend="efficient"),
    "compile-vocab50257": dict(padded_vocab_size=50257),
}


class PreviousForward(torch.nn.Module):
    """The model as training called it before the loss-only forward: the logits come back with the
    loss. Eager, they stay alive through backward (train_step holds them in `_`); compiled, they are
    an output of the graph, so AOTAutograd also makes a (zero) gradient for them in every backward."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx, targets=None, return_logits=True):
        return self.gpt(idx, targets, return_logits=True)  # whatever the caller asked for


def cpu_step_memory(step):
    """Peak bytes that step() has allocated at once, from the profiler's memory events: while it
    profiles, the CPU allocator reports each allocation and free with a running total of the bytes
    allocated since profiling began. So the figure is this step's alone (activations, gradients,
    temporaries), without the weights and optimizer state allocated before it, without what the
    compiler or earlier variants used: the process's max RSS (getrusage) would mix all of those in,
    and counts pages that the allocator keeps, not tensors."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        with open(os.path.join(tmp, "trace.json")) as f:
            events = json.load(f)["traceEvents"]
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)


def measured_step(step, device):
    """One untimed step: (the bytes it allocates at its peak beyond what was allocated when it
    started, host-device syncs in it). On CUDA any sync raises (sync debug mode "error")."""
    if device.type != "cuda":
        return cpu_step_memory(step), "-"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync inside the step raises
    try:
        step()
        syncs = "none"
    except RuntimeError as e:
        syncs = f"SYNC: {str(e).splitlines()[0][:60]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return torch.cuda.max_memory_allocated() - start, syncs


def run_variant(name, args, device):
    v = dict(compile="default", batch_size=args.batch_size, backend=None, padded_vocab_size=50304, logits=False)
    v.update(VARIANTS[name])
    B, T = v["batch_size"], args.seq_len
    if args.total_batch_size % (B * T):
        raise SystemExit(f"--total-batch-size {args.total_batch_size} is not a multiple of {B} x {T}")
    accum = args.total_batch_size // (B * T)
    torch.manual_seed(0)
    config = GPTConfig(block_size=T, padded_vocab_size=v["padded_vocab_size"], **args.shape)
    raw = GPT(config).to(device)
    optimizer = raw.configure_optimizers(0.1, 6e-4, device.type, verbose=False)
    model = PreviousForward(raw) if v["logits"] else raw
    model = torch.compile(model, mode=v["compile"]) if v["compile"] else model
    tokens = np.random.default_rng(0).integers(0, 50257, 4 * args.total_batch_size + 1, dtype=np.uint16)
    loader = DataLoader([("synthetic", tokens)], B, T, grad_accum_steps=accum, shuffle=False, device=device)
    dtype = utils.autocast_dtype(device.type, args.dtype)
    cuda = device.type == "cuda"
    attention = sdpa_kernel(BACKENDS[v["backend"]]) if v["backend"] else contextlib.nullcontext()

    def step():
        return train_step(model, optimizer, loader, accum, 6e-4, 1.0, dtype)

    with attention:
        try:
            for _ in range(args.warmup):  # compile, autotuning, allocator warm-up
                step()
        except RuntimeError as e:  # e.g. an attention backend this GPU or build lacks
            return dict(name=name, error=str(e).splitlines()[0][:80])
        step_mem, syncs = measured_step(step, device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss, norm = step()
        if cuda:
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / args.steps
        else:
            ms = (time.perf_counter() - t0) * 1000 / args.steps
    tok_per_s = args.total_batch_size / (ms / 1000)
    return dict(name=name, B=B, accum=accum, ms=ms, tok_per_s=tok_per_s, loss=loss.item(), syncs=syncs,
                mfu=raw.estimate_mfu(tok_per_s, T, args.peak_tflops * 1e12) if cuda else None,
                mem=torch.cuda.max_memory_allocated() / 2**30 if cuda else None, step_mem=step_mem / 2**30)


def count(s):
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return int(s)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide model; defaults T=64, micro-batch 8, "
                   "1024 tokens per step (CPU, CI)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    p.add_argument("--batch-size", type=count, help="default micro-batch (default 64; 8 with --tiny)")
    p.add_argument("--seq-len", type=count, help="tokens per sequence (default 1024; 64 with --tiny)")
    p.add_argument("--total-batch-size", type=count, help="tokens per step (default 524288; 1024 with --tiny)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--steps", type=count, default=10, help="timed steps (default 10)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_FLOPS / 1e12, help="dense bf16 peak for MFU (H100/H200: 989)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast, as "
                   "train_gpt2.py's --dtype (auto: bfloat16 on CUDA and on CPUs with native bfloat16)")
    p.add_argument("--glibc-malloc", action="store_true", help="on a CPU, leave glibc's allocator as it is, to "
                   "measure what train_gpt2.py's utils.keep_freed_memory saves (default: keep freed memory, as it does)")
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")
    args.shape = dict(n_layer=2, n_head=2, n_embd=64) if args.tiny else dict(n_layer=12, n_head=12, n_embd=768)
    for flag, full, tiny in (("batch_size", 64, 8), ("seq_len", 1024, 64), ("total_batch_size", 524288, 1024)):
        if getattr(args, flag) is None:  # flags given explicitly win over --tiny's defaults
            setattr(args, flag, tiny if args.tiny else full)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here (on a CPU: python bench.py --tiny)")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # events, synchronize and memory stats use the current device
        torch.set_float32_matmul_precision("high")  # as train_gpt2.py does
    elif not args.glibc_malloc:
        utils.keep_freed_memory()  # as train_gpt2.py does on a CPU
    gpu = (f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"
           if device.type == "cuda" else "CPU")
    malloc = "" if device.type == "cuda" else ", glibc malloc as is" if args.glibc_malloc else ", freed memory kept"
    print(f"torch {torch.__version__} on {gpu}; model {args.shape}, T={args.seq_len}, "
          f"{args.total_batch_size:,} tokens per step, autocast {args.dtype}{malloc}")

    # peak memory: everything allocated on the GPU at the busiest moment (weights, optimizer state, the
    # step); step memory: the most one step allocated beyond what was there when it began (on a CPU,
    # from the profiler's memory events: see cpu_step_memory). A row appears as soon as its variant is
    # done, so a run cut short (a time limit) still leaves the rows it finished.
    print("\n| variant | micro-batch x accum | ms/step | tokens/s | MFU | peak memory | step memory | syncs in step |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.variants.split(","):
        print(table_row(run_variant(name, args, device)), flush=True)
        torch._dynamo.reset()  # each variant compiles afresh
        gc.collect()  # a failed variant's tensors may sit in reference cycles (its exception's frames)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def table_row(r):
    if "error" in r:
        return f"| {r['name']} | | unavailable: {r['error']} | | | | | |"
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    mem = f"{r['mem']:.1f} GiB" if r["mem"] is not None else "-"
    return (f"| {r['name']} | {r['B']} x {r['accum']} | {r['ms']:.1f} | {r['tok_per_s']:,.0f} | {mfu} | {mem} | "
            f"{r['step_mem']:.3f} GiB | {r['syncs']} |")


if __name__ == "__main__":
    main()
