"""Sampling speed of GPT-2 124M against its limit: our KV-cache generate (float32, and under bfloat16
autocast), recomputing every step, and HF generate, side by side in one run.

At batch 1, each new token multiplies one vector by every weight matrix: the work is tiny and every
weight is read from memory once per token, so memory bandwidth sets the limit (the "roofline"):
tokens/s <= bandwidth / bytes of weights read per token. The bandwidth is measured in the same run
(a sum over a 512 MB float32 tensor, which reads memory at the speed the hardware allows), so
the percentage holds even on a machine that others are loading.

All runs use the same weights (random: no download needed; speed does not depend on them) and
greedy decoding, so the float32 ones must return the same tokens, which is checked (bfloat16
rounds differently: how many of its tokens agree is printed). Each method runs --repeats times,
interleaved with the others and with the bandwidth measurement; the best run of each is shown.

    python bench_generate.py                               # 124M, 256 new tokens, batch 1, CPU
    python bench_generate.py --threads 1,2 --skip-no-cache # the table for 1 and for 2 threads
    python bench_generate.py --new-tokens 64 --device cuda
"""
import argparse
import time

import torch

import weights
from model import EOT, GPT, GPTConfig

PROMPT = [15496, 11, 314, 1101, 257, 3303, 2746, 11]  # "Hello, I'm a language model,"


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def memory_bandwidth(device, mbytes=512, repeats=3):
    """Bytes/s that a sum over an mbytes float32 tensor reads (best of repeats): the speed at which
    this device streams memory, far more than its caches hold."""
    x = torch.ones(mbytes * 2**20 // 4, device=device)
    best = min(timed(x.sum, device)[1] for _ in range(repeats))
    return x.numel() * 4 / best


def bytes_per_token(model, matmul_bytes):
    """Bytes of parameters one decoding step reads: every Linear (weights and biases; lm_head, the tied
    wte, once, padded rows included) at matmul_bytes per number (4 float32, 2 under bfloat16
    autocast), the float32 LayerNorms, and one row each of wte and wpe (lookups). The KV cache
    read adds 2 * n_layer * n_embd * 4 bytes per position so far: 3% for 124M at 256 positions."""
    C = model.config.n_embd
    matmul = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                 for m in model.modules() if isinstance(m, torch.nn.Linear))
    norms = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters())
    return matmul * matmul_bytes + (norms + 2 * C) * 4


def matmuls_alone(model, batch_size, steps, device, autocast_dtype=None):
    """Seconds for steps decoding steps' matrix-vector products and nothing else: every Linear of the
    model (lm_head too) applied to a (batch, 1, in_features) input. No step can be faster than this
    with these matmul kernels: the gap between it and the roofline is the kernels' (e.g. the BLAS
    library's matrix-vector product); the gap between it and generate is everything else a step does."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(batch_size, 1, m.in_features, device=device) for m in linears}

    def run():  # one autocast region, as around generate: weights are cast once, then cached
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=autocast_dtype,
                                             enabled=autocast_dtype is not None):
            for _ in range(steps):
                for m in linears:
                    m(inputs[m.in_features])

    return timed(run, device)[1]


def parse_threads(s):
    try:
        counts = [int(x) for x in s.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected thread counts like 2 or 1,2; got {s!r}")
    return counts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences generated at once (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=parse_threads, default=None, help="CPU threads (torch.set_num_threads), "
                   "or a list like 1,2 to compare side by side (default: PyTorch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each method, interleaved; the best counts "
                   "(default 3)")
    p.add_argument("--skip-no-cache", action="store_true", help="skip the slow recompute-every-step run "
                   "(otherwise run once)")
    p.add_argument("--skip-bf16", action="store_true", help="skip the bfloat16 autocast run")
    args = p.parse_args()

    torch.manual_seed(0)
    ours = GPT(GPTConfig()).to(args.device).eval()
    hf = weights.to_hf(ours).to(args.device)  # the same weights in transformers' GPT2LMHeadModel
    B, n, device_type = args.batch_size, args.new_tokens, torch.device(args.device).type
    prompt = torch.tensor([PROMPT] * B, device=args.device)

    def ours_generate(dtype=None, use_cache=True):
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            return ours.generate(prompt, n, temperature=0, use_cache=use_cache)

    def hf_generate():
        with torch.no_grad():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=EOT)

    # name: (bytes a matmul weight takes, function returning (greedy output or None, seconds), runs)
    methods = {"ours, KV cache": (4, lambda: timed(ours_generate, args.device), args.repeats),
               "  its matmuls alone": (4, lambda: (None, matmuls_alone(ours, B, n, args.device)), args.repeats)}
    if not args.skip_bf16:
        methods["ours, KV cache, bf16 autocast"] = (2, lambda: timed(lambda: ours_generate(torch.bfloat16),
                                                                     args.device), args.repeats)
        methods["  its matmuls alone, bf16"] = (2, lambda: (None, matmuls_alone(ours, B, n, args.device,
                                                                                 torch.bfloat16)), args.repeats)
    methods["HF transformers generate"] = (4, lambda: timed(hf_generate, args.device), args.repeats)
    if not args.skip_no_cache:  # minutes on a CPU: once
        methods["ours, no cache (recompute)"] = (4, lambda: timed(lambda: ours_generate(use_cache=False),
                                                                  args.device), 1)

    threads = args.threads or [torch.get_num_threads()]
    best = {(t, name): float("inf") for t in threads for name in methods}
    bandwidth = {t: 0.0 for t in threads}
    outputs = {}
    for t in threads:  # warm-up: allocator, kernels, oneDNN's primitives for this thread count
        torch.set_num_threads(t)
        ours.generate(prompt, 4, temperature=0)
        if not args.skip_bf16:
            with torch.autocast(device_type, dtype=torch.bfloat16):
                ours.generate(prompt, 4, temperature=0)
    for r in range(args.repeats):
        for t in threads:  # the same repeat of every thread count and method close together in time
            torch.set_num_threads(t)
            bandwidth[t] = max(bandwidth[t], memory_bandwidth(args.device))
            for name, (_, fn, runs) in methods.items():
                if r < runs:
                    output, seconds = fn()
                    best[t, name] = min(best[t, name], seconds)
                    if output is not None:
                        outputs.setdefault(name, []).append(output)

    # every float32 greedy output (each method, each run, each thread count) must be the same tokens
    reference, same = outputs["ours, KV cache"][0], []
    for name in ("ours, KV cache", "HF transformers generate", "ours, no cache (recompute)"):
        if name in outputs:
            assert all(torch.equal(o, reference) for o in outputs[name]), f"{name}: a greedy output differs"
            same.append(name)
    agree = ""
    if not args.skip_bf16:
        new = reference[:, len(PROMPT):]
        equal = (outputs["ours, KV cache, bf16 autocast"][0][:, len(PROMPT):] == new).float()
        agree = f"; bf16 autocast: {equal.mean():.0%} of its tokens equal float32's"

    print(f"GPT-2 124M, torch {torch.__version__}, device {args.device}, batch {B}, prompt {len(PROMPT)} tokens, "
          f"{n} new tokens, greedy; best of {args.repeats} interleaved runs"
          f"{'' if args.skip_no_cache else ' (no cache: 1 run)'}")
    print(f"float32 greedy outputs identical: {', '.join(same)}{agree}")
    for t in threads:
        bw = bandwidth[t]
        print(f"\nthreads {t}: memory bandwidth {bw / 1e9:.1f} GB/s (sum over 512 MB, best of {3 * args.repeats})")
        print(f"{'method':32s} {'seconds':>8s} {'tokens/s':>9s} {'MB/token':>9s} {'roofline':>9s} {'% of it':>8s}")
        for name, (matmul_bytes, *_) in methods.items():
            seconds, per_token = best[t, name], bytes_per_token(ours, matmul_bytes)
            tokens_per_s, roofline = B * n / seconds, B * bw / per_token
            print(f"{name:32s} {seconds:8.2f} {tokens_per_s:9.1f} {per_token / 1e6:9.1f} {roofline:9.1f} "
                  f"{tokens_per_s / roofline:8.0%}")


if __name__ == "__main__":
    main()
