"""How long the training thread waits for dataloader.DataLoader.next_batch, and at a shard switch.

Writes a shard directory of random documents (with fineweb.py's manifest.json) in a temporary
directory, then, in one run, side by side:

  1. next_batch on the training thread, with the next shard prepared in the background
     (prefetch=True, the default) and without (prefetch=False: built at the switch): the median
     call, and the calls that switch shards. Between calls the thread sleeps --step-ms, as it
     waits for the GPU in training (a sleep, like a CUDA sync, lets the background thread run).
  2. Building one shuffled shard: the previous version's slice-per-document concatenation against
     dataloader.permute_documents (the same order; checked), for --doc-len documents and for short ones.
  3. DataLoader() itself: shards the manifest vouches for (not read) against a full scan of the ids.

    python bench_dataloader.py                       # 3 shards of 20M tokens: under a minute
    python bench_dataloader.py --tokens 100000000    # fineweb.py's shard size
"""
import argparse
import json
import os
import statistics
import tempfile
import time
import tracemalloc

import numpy as np

from dataloader import DataLoader, document_bounds, permute_documents
from model import EOT


def random_shard(n, doc_len, rng):
    """n tokens of documents of about doc_len tokens (geometric lengths), each starting with EOT."""
    tokens = rng.integers(0, EOT, n, dtype=np.uint16)
    starts = np.cumsum(rng.geometric(1 / doc_len, size=2 * n // doc_len + 10))
    tokens[starts[starts < n]] = EOT
    tokens[0] = EOT
    return tokens


def write_shards(directory, num_shards, n, doc_len, seed):
    rng = np.random.default_rng(seed)
    files, entries = [], []
    for i in range(num_shards):
        tokens = random_shard(n, doc_len, rng)
        files.append(os.path.join(directory, f"edufineweb_train_{i + 1:06d}.npy"))
        np.save(files[-1], tokens)
        entries.append({"file": os.path.basename(files[-1]), "tokens": n, "max_token": int(tokens.max())})
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump({"shards": entries}, f)
    return files


def old_shuffle(tokens, bounds, perm):
    """The previous version: one slice per document, concatenated."""
    return np.concatenate([tokens[bounds[j]: bounds[j + 1]] for j in perm])


def new_shuffle(tokens, bounds, perm):
    return permute_documents(tokens, bounds, perm)


def time_build(shuffle, tokens, bounds, perm, repeats=3):
    """(best seconds of `repeats`, peak traced MB, result): timed without tracemalloc, which slows allocations."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = shuffle(tokens, bounds, perm)
        times.append(time.perf_counter() - t0)
        del out
    seconds = min(times)
    tracemalloc.start()
    out = shuffle(tokens, bounds, perm)
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return seconds, peak, out


def time_loader(files, args, prefetch):
    """(median next_batch ms, [ms of each call that switched shards]) over --epochs epochs."""
    loader = DataLoader(files, args.batch_size, args.seq_len, seed=args.seed, prefetch=prefetch)
    calls = args.epochs * len(files) * args.tokens // (args.batch_size * args.seq_len)
    plain, switches = [], []
    for _ in range(calls):
        where = (loader.epoch, loader.shard)
        t0 = time.perf_counter()
        loader.next_batch()
        ms = (time.perf_counter() - t0) * 1000
        (switches if (loader.epoch, loader.shard) != where else plain).append(ms)
        time.sleep(args.step_ms / 1000)  # the GPU's part of a step
    return statistics.median(plain), switches


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=20_000_000, help="tokens per shard")
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--doc-len", type=int, default=400, help="mean document length (FineWeb-edu: ~1000)")
    p.add_argument("--short-doc-len", type=int, default=10, help="mean length of the short documents' shard")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--step-ms", type=float, default=2.0, help="sleep between next_batch calls (the GPU's work)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing {args.shards} shards of {args.tokens:,} tokens to {tmp} ...", flush=True)
        files = write_shards(tmp, args.shards, args.tokens, args.doc_len, args.seed)

        print("building one shuffled shard, old and new ...", flush=True)
        builds = []
        short = random_shard(args.tokens // 10, args.short_doc_len, np.random.default_rng(args.seed + 1))
        for label, tokens in ((f"{args.tokens / 1e6:g}M tokens, ~{args.doc_len}-token documents",
                               np.load(files[0], mmap_mode="r")),
                              (f"{len(short) / 1e6:g}M tokens, ~{args.short_doc_len}-token documents", short)):
            bounds = document_bounds(tokens)
            perm = np.random.default_rng(0).permutation(len(bounds) - 1)
            old_s, old_mb, old = time_build(old_shuffle, tokens, bounds, perm)
            new_s, new_mb, new = time_build(new_shuffle, tokens, bounds, perm)
            builds.append((label, old_s, old_mb, new_s, new_mb, np.array_equal(old, new)))
            del old, new

        print("DataLoader(): manifest-verified, then a full scan ...", flush=True)
        checks = []
        for manifest in ("manifest.json", "manifest.json.off"):  # shuffle=False: the checks alone
            os.rename(os.path.join(tmp, "manifest.json"), os.path.join(tmp, manifest))
            t0 = time.perf_counter()
            DataLoader(files, args.batch_size, args.seq_len, shuffle=False)
            checks.append(time.perf_counter() - t0)
            os.rename(os.path.join(tmp, manifest), os.path.join(tmp, "manifest.json"))

        results = {}
        for prefetch in (False, True):
            print(f"next_batch with prefetch={prefetch} ...", flush=True)
            results[prefetch] = time_loader(files, args, prefetch)

    per_call = args.batch_size * args.seq_len
    print(f"\n### next_batch on the training thread ({args.shards} shards x {args.tokens:,} tokens, "
          f"{per_call:,} tokens a call, {args.step_ms:g} ms sleep between calls)\n")
    print("| | prefetch off (built at the switch) | prefetch on (built in the background) |")
    print("|---|---|---|")
    (off_median, off_switch), (on_median, on_switch) = results[False], results[True]
    print(f"| median call | {off_median:.3f} ms | {on_median:.3f} ms |")
    mean = statistics.mean
    print(f"| call at a shard switch, mean | {mean(off_switch):.1f} ms | {mean(on_switch):.1f} ms |")
    print(f"| call at a shard switch, max | {max(off_switch):.1f} ms | {max(on_switch):.1f} ms |")
    print(f"| shard switches | {len(off_switch)} | {len(on_switch)} |")
    print("\n### Building one shuffled shard (the same order: checked)\n")
    print("| shard (best of 3) | old: a slice per document, concatenated | new: permute_documents | speed-up | same |")
    print("|---|---|---|---|---|")
    for label, old_s, old_mb, new_s, new_mb, same in builds:
        print(f"| {label} | {old_s:.2f} s, peak {old_mb:,.0f} MB | {new_s:.2f} s, peak {new_mb:,.0f} MB | "
              f"{old_s / new_s:.1f}x | {'yes' if same else 'NO'} |")
    print(f"\n### DataLoader(shuffle=False) on {args.shards} x {args.tokens:,} tokens: the checks at start "
          "(files in the page cache)\n")
    print("| manifest.json vouches (headers only) | no manifest (every token id read) |")
    print("|---|---|")
    print(f"| {checks[0]:.3f} s | {checks[1]:.3f} s |")
    if not all(b[-1] for b in builds):
        raise SystemExit("error: permute_documents gave another order than the slice-and-concatenate reference")


if __name__ == "__main__":
    main()
