"""HellaSwag scoring speed: the plain loop (`score_naive`: one example per forward pass, 4 full
rows, logits at every position) against hellaswag.py's batched, packed scoring, on the same
examples. Both must also pick the same ending for every example, which is checked: in float32 a
difference exits with status 1 (in 16-bit, rounding may flip a near-tie).

    python bench_hellaswag.py --random-init --fake-from input.txt      # 124M shape, offline, 32 examples
    python bench_hellaswag.py -m gpt2 --device cuda --dtype bfloat16 --limit 1000

--fake-from builds HellaSwag-shaped examples from any text's sentences, for machines that cannot
download the real data; speed does not depend on which ending is right.
"""
import argparse
import random
import re
import sys
import time

import torch
from tqdm import tqdm

import utils
from hellaswag import (DEFAULT_CACHE_DIR, NUM_ENDINGS, SPLITS, HellaSwagUnavailable, _batches, _score_batch,
                       check_example, encode_example, inference, load_examples, positive_int, score_naive)


def fake_examples(text_file, n, seed=0):
    """n examples in the official schema built from any text, for benchmarking offline: the
    context is 1-3 consecutive sentences, the true ending the next one, the others random
    sentences of about its length."""
    with open(text_file, encoding="utf-8") as f:
        sentences = [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", f.read())]
    sentences = [s for s in sentences if 3 <= len(s.split()) <= 30]
    by_words = {}  # like HellaSwag's, the wrong endings are about as long as the right one
    for s in sentences:
        by_words.setdefault(len(s.split()), []).append(s)
    if len(sentences) < 10:
        raise ValueError(f"{text_file}: too few sentences to build examples from")
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        k = rng.randint(1, 3)
        start = rng.randrange(len(sentences) - k)
        ctx, true, label = " ".join(sentences[start : start + k]), sentences[start + k], rng.randrange(4)
        words = len(true.split())
        similar = [s for w in range(words - 2, words + 3) for s in by_words.get(w, []) if s != true]
        endings = rng.sample(similar if len(similar) >= 3 else sentences, 3)
        endings.insert(label, true)
        examples.append(dict(ind=i, activity_label="fake", ctx_a=ctx, ctx_b="", ctx=ctx, split="val",
                             split_type="fake", endings=endings, source_id=f"fake~{start}", label=label))
    return examples


def benchmark(model, examples, device, batch_size=32, autocast_dtype=None):
    """examples/s of the plain loop and of the batched scoring on the same examples, and the
    fraction of predictions (acc and acc_norm) on which they agree. The two alternate batch by
    batch, so that a busy machine slows both alike."""
    t0 = time.perf_counter()
    encoded = [encode_example(ex, model.config.block_size) for ex in examples]  # the batched path's own work
    t_fast, t_naive = time.perf_counter() - t0, 0.0
    # [summed, mean] loss of each ending, (2, N, 4), by each method
    naive, fast = torch.empty(2, len(examples), NUM_ENDINGS), torch.empty(2, len(examples), NUM_ENDINGS)
    with inference(model, device, autocast_dtype):
        score_naive(model, examples[0], device)  # warm-up: CUDA context, kernels, allocator
        _score_batch(model, encoded[:1], device)
        for batch in tqdm(_batches(encoded, batch_size), desc="benchmark", unit="batch"):
            t0 = time.perf_counter()
            for i in batch:
                naive[:, i] = torch.stack(score_naive(model, examples[i], device)).cpu()  # .cpu() waits for the GPU
            t1 = time.perf_counter()
            fast[:, batch] = torch.stack(_score_batch(model, [encoded[i] for i in batch], device)).cpu()
            t_naive, t_fast = t_naive + t1 - t0, t_fast + time.perf_counter() - t1
    return dict(n=len(examples), naive_per_s=len(examples) / t_naive, fast_per_s=len(examples) / t_fast,
                speedup=t_naive / t_fast, agreement=(naive.argmin(2) == fast.argmin(2)).float().mean().item(),
                max_rel_diff=((naive - fast).abs() / naive.abs()).max().item())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default="gpt2", help="an OpenAI size (gpt2, gpt2-medium, gpt2-large, gpt2-xl), "
                   "a Hugging Face save_pretrained directory, or a train_gpt2.py checkpoint (default: gpt2)")
    p.add_argument("--random-init", action="store_true", help="random weights of the -m size instead (no download; "
                   "speed does not depend on the weights)")
    p.add_argument("--fake-from", metavar="TEXT_FILE", help="build fake examples from sentences of a text file "
                   "(offline) instead of reading HellaSwag")
    p.add_argument("--split", default="val", choices=SPLITS, help="split to download and time (default: val)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where splits are downloaded (default: hellaswag/)")
    p.add_argument("--data-file", help="a local jsonl (official schema) instead of a downloaded split")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, ... "
                   "(default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="examples per forward pass (default: 32)")
    p.add_argument("--limit", type=positive_int, default=32, help="the first N examples (default: 32)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="autocast dtype (default: float32, where the two must agree exactly)")
    args = p.parse_args(argv)

    try:
        device = utils.usable_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    autocast_dtype = utils.autocast_dtype(torch.device(device).type, args.dtype)
    from model import GPT, config_for

    try:
        model = GPT(config_for(args.model)) if args.random_init else GPT.from_pretrained(args.model)
    except (ValueError, OSError) as e:
        print(f"error: -m {args.model}: {e}", file=sys.stderr)
        return 2
    block_size = model.config.block_size
    try:
        if args.fake_from:
            examples = fake_examples(args.fake_from, args.limit)
            for i, ex in enumerate(examples):  # a model with a short block could not fit a long sentence
                check_example(ex, f"{args.fake_from}, fake example {i}", block_size)
        else:
            examples = load_examples(args.split, args.cache_dir, args.data_file, block_size=block_size)[: args.limit]
    except HellaSwagUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.to(device)

    result = benchmark(model, examples, device, args.batch_size, autocast_dtype)
    weights = " (random weights)" if args.random_init else ""
    print(f"{result['n']} examples, {args.model}{weights}, {device}, {args.dtype}")
    print(f"plain loop  {result['naive_per_s']:8.2f} examples/s")
    print(f"batched     {result['fast_per_s']:8.2f} examples/s  (batch size {args.batch_size})")
    print(f"speedup     {result['speedup']:8.2f}x")
    same = result["agreement"] == 1.0
    print(f"identical predictions: {'yes' if same else 'NO'} ({result['agreement']:.2%} agree); "
          f"largest relative difference in a loss {result['max_rel_diff']:.1e}")
    # in float32 the two must agree exactly; in 16-bit, rounding may flip a near-tie
    return 0 if same or autocast_dtype is not None else 1


if __name__ == "__main__":
    utils.keep_freed_memory()  # as hellaswag.py does (process-wide: not when a test calls main())
    sys.exit(main())
