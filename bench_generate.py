"""Sampling speed of GPT-2 124M: our KV-cache generate vs recomputing every step vs HF generate.

All three run on the same weights (random: no download needed; speed does not depend on them)
and greedy decoding, so they must also return the same tokens, which is checked.

    python bench_generate.py                       # 124M, 256 new tokens, batch 1, on the CPU
    python bench_generate.py --new-tokens 64 --device cuda
"""
import argparse
import time

import torch
import weights
from model import EOT, GPT, GPTConfig


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences generated at once (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--skip-no-cache", action="store_true", help="skip the slow recompute-every-step run")
    args = p.parse_args()

    torch.manual_seed(0)
    ours = GPT(GPTConfig()).to(args.device).eval()
    hf = weights.to_hf(ours).to(args.device)  # the same weights in transformers' GPT2LMHeadModel
    prompt = torch.tensor([[15496, 11, 314, 1101, 257, 3303, 2746, 11]] * args.batch_size, device=args.device)  # "Hello, I'm a language model,"
    n = args.new_tokens

    ours.generate(prompt, 4, temperature=0)  # warm-up (allocator, kernels)
    rows = []
    cached, t = timed(lambda: ours.generate(prompt, n, temperature=0), args.device)
    rows.append(("ours, KV cache", t))
    if not args.skip_no_cache:
        recomputed, t = timed(lambda: ours.generate(prompt, n, temperature=0, use_cache=False), args.device)
        rows.append(("ours, no cache (recompute)", t))
        assert torch.equal(cached, recomputed), "cache and no-cache greedy outputs differ"
    with torch.no_grad():
        ref, t = timed(lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                           min_new_tokens=n, do_sample=False, pad_token_id=EOT), args.device)
    rows.append(("HF transformers generate", t))
    assert torch.equal(cached, ref), "our greedy output differs from HF's"

    print(f"GPT-2 124M, torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, prompt 8 tokens, {n} new tokens, greedy (all outputs identical)")
    print(f"{'method':30s} {'seconds':>9s} {'tokens/s':>9s}")
    for name, t in rows:
        print(f"{name:30s} {t:9.2f} {args.batch_size * n / t:9.1f}")


if __name__ == "__main__":
    main()
