"""HellaSwag, completion style: which of 4 endings does the model find most likely after the context?

Each ending is scored by the cross-entropy of its tokens given the context: acc picks the lowest
summed loss, acc_norm the lowest mean loss per token (which does not favour short endings). This is
the method of Karpathy's build-nanoGPT; on the 10,042 validation examples OpenAI's GPT-2 124M gets
acc 0.2859 / acc_norm 0.2955 and GPT-2 1558M 0.3842 / 0.4893.

    python hellaswag.py -m gpt2                       # or gpt2-xl, an HF directory, a train_gpt2.py checkpoint
    python hellaswag.py -m log/ckpt_019073.pt --dtype bfloat16 --limit 1000

Speed comes from doing less work, in fewer passes (see `_score_batch`): the 4 endings of an example
share one context, so it is computed once, with the endings packed after it in a single row; the
50257-way vocabulary projection, a third of a 124M model's work per token, is done only where a
position predicts an ending token; and many examples share each forward pass. `score_naive` is
the plain loop (one example, 4 full rows, logits at every position), the reference for the tests
and for bench_hellaswag.py, which times the two against each other.
"""
import argparse
import functools
import json
import math
import os
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils

DEFAULT_CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")
DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
SPLITS = ("train", "val", "test")
NUM_ENDINGS = 4


class HellaSwagUnavailable(RuntimeError):
    """The split is not in the cache directory and cannot be downloaded (offline?)."""


# ---------------------------------------------------------------- data


def download_split(split, cache_dir=DEFAULT_CACHE_DIR):
    """Path of hellaswag_{split}.jsonl in cache_dir, downloading it first if it is not there."""
    path = os.path.join(cache_dir, f"hellaswag_{split}.jsonl")
    if not os.path.isfile(path):
        url = DATA_URL.format(split=split)
        try:  # a cut connection or Ctrl-C leaves nothing under path (utils.download), so a retry starts afresh
            utils.download(url, path)
        except OSError as e:  # no network, HTTP errors, a download cut short
            reason = str(e).removeprefix(f"{url}: ")  # utils.download's own errors start with the url
            raise HellaSwagUnavailable(f"could not download {url} ({reason}); with no internet, copy the file "
                                       f"to {path} or pass a local file with --data-file") from e
    return path


def load_examples(split="val", cache_dir=DEFAULT_CACHE_DIR, data_file=None, download=True, block_size=None):
    """Validated examples of data_file, or of the split (downloaded into cache_dir once). With
    block_size (the model's), every ending must also leave room for at least one context token."""
    if data_file is None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        data_file = os.path.join(cache_dir, f"hellaswag_{split}.jsonl")
        if not os.path.isfile(data_file):
            if not download:
                raise HellaSwagUnavailable(f"{data_file} does not exist and downloading is off")
            data_file = download_split(split, cache_dir)
    elif not os.path.isfile(data_file):
        raise FileNotFoundError(f"{data_file}: no such file")
    examples = []
    with open(data_file, "rb") as f:  # bytes, decoded line by line: a bad byte's error can name its line
        for lineno, raw in enumerate(f, 1):
            where = f"{data_file}, line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line is 0x{raw[e.start]:02x}); "
                                 "save the file as UTF-8") from None
            if line.strip():
                try:
                    example = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
                examples.append(check_example(example, where, block_size))
    if not examples:
        raise ValueError(f"{data_file}: no examples")
    return examples


def check_example(example, where="example", block_size=None):
    """The fields scoring needs, in the official schema: ctx, 4 endings, label 0-3. With block_size,
    also that no ending is so long that no context token would fit before it."""
    if not isinstance(example, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(example).__name__}")
    for field in ("ctx", "endings", "label"):
        if field not in example:
            hint = " (HellaSwag's test labels are hidden: evaluate on val)" if field == "label" else ""
            raise ValueError(f"{where}: missing field {field!r}{hint}")
    if not isinstance(example["ctx"], str) or not example["ctx"]:
        raise ValueError(f"{where}: 'ctx' must be a non-empty string")
    endings = example["endings"]
    if not (isinstance(endings, list) and len(endings) == NUM_ENDINGS and all(isinstance(e, str) for e in endings)):
        raise ValueError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings")
    label = example["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise ValueError(f"{where}: 'label' must be an integer 0-{NUM_ENDINGS - 1}, got {label!r}")
    if block_size is not None:  # the context is cut from the left to fit (encode_example), but never to nothing
        enc = gpt2_tokenizer()
        for j, ending in enumerate(endings):
            n = len(enc.encode_ordinary(" " + ending))  # tokenized as encode_example does
            if n >= block_size:
                raise ValueError(f"{where}: ending {j} is {n} tokens long, which leaves no room for context in the "
                                 f"model's block size of {block_size}; remove the example or use a model with a "
                                 "longer block")
    return example


@functools.cache
def gpt2_tokenizer():
    import tiktoken

    return tiktoken.get_encoding("gpt2")


def encode_example(example, block_size=None):
    """(context tokens, [tokens of each " " + ending], label). When context + longest ending is
    longer than block_size, tokens are dropped from the left of the context, the same for all 4.
    The text is plain text: "<|endoftext|>" in it is a few ordinary tokens, never the special token."""
    enc = gpt2_tokenizer()
    ctx = enc.encode_ordinary(example["ctx"])
    endings = [enc.encode_ordinary(" " + e) for e in example["endings"]]  # " " + "" is still one token
    longest = max(len(e) for e in endings)
    if block_size is not None and len(ctx) + longest > block_size:
        room = block_size - longest
        if room < 1:  # load_examples(block_size=...) reports this earlier, naming the file and line
            raise ValueError(f"an ending of {longest} tokens leaves no room for context in block_size {block_size}")
        ctx = ctx[-room:]
    return ctx, endings, example["label"]


def render_example(example, block_size=None):
    """tokens (4, T): the context followed by each ending, right-padded with 0; mask (4, T): 1 over
    the ending tokens; and the label."""
    ctx, endings, label = encode_example(example, block_size)
    T = len(ctx) + max(len(e) for e in endings)
    tokens = torch.zeros(NUM_ENDINGS, T, dtype=torch.long)
    mask = torch.zeros(NUM_ENDINGS, T, dtype=torch.long)
    for i, e in enumerate(endings):
        tokens[i, : len(ctx) + len(e)] = torch.tensor(ctx + e)
        mask[i, len(ctx) : len(ctx) + len(e)] = 1
    return tokens, mask, label


# ---------------------------------------------------------------- scoring


@contextmanager
def inference(model, device, autocast_dtype=None):
    """Eval mode (restored afterwards), no autograd, optional autocast."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=autocast_dtype,
                                             enabled=autocast_dtype is not None):
            yield
    finally:
        model.train(was_training)


def score_naive(model, example, device):
    """The plain way, for reference: 4 full rows in one forward pass, logits at every position.
    Returns (summed loss, mean loss) of each ending, shape (4,). Call inside `inference`."""
    tokens, mask, _ = render_example(example, model.config.block_size)
    tokens, mask = tokens.to(device), mask.to(device)
    logits, _ = model(tokens)
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")
    mask = mask[:, 1:]  # position t predicts token t + 1
    summed = (losses * mask).sum(dim=1)
    return summed, summed / mask.sum(dim=1)


def packed_length(ctx, endings):
    """Length of an encoded example's packed row (see _score_batch): the context, then each ending
    but its last token."""
    return len(ctx) + sum(len(e) - 1 for e in endings)


def _batches(encoded, batch_size, max_padding=0.25):
    """Indices into encoded, in batches of at most batch_size, sorted by packed row length. A batch
    closes early rather than pad its rows by more than max_padding of their real tokens: a few
    examples spread over many lengths (--limit, a rank's share) would otherwise waste most of a
    batch on padding; on the whole val set batches are full and barely padded."""
    lengths = [packed_length(ctx, endings) for ctx, endings, _ in encoded]
    batches, batch, real_tokens = [], [], 0
    for i in sorted(range(len(encoded)), key=lengths.__getitem__):
        longest = lengths[i]  # ascending order: the newest is the longest, every row is padded to it
        too_padded = (len(batch) + 1) * longest > (1 + max_padding) * (real_tokens + longest)
        if batch and (len(batch) == batch_size or too_padded):
            batches.append(batch)
            batch, real_tokens = [], 0
        batch.append(i)
        real_tokens += longest
    return batches + [batch] if batch else batches


def _score_batch(model, batch, device):
    """(summed, mean) losses, each (B, 4), of the endings of B encoded examples, in one forward pass.

    Each example is one row: its context once, then each ending but its last token (which predicts
    nothing). Every ending's positions restart where the context ends, and the mask lets an ending
    token see the context and its own ending's earlier tokens only, so each token computes what it
    would in the plain row [context + ending], while the context is computed once instead of 4 times.
    Logits are computed only at the positions that predict an ending token.

    A worked example: context x0 x1 x2; endings A = a0 a1 a2, B = b0, C = c0 c1, D = d0. The row:

        column     0   1   2   3   4   5
        token     x0  x1  x2  a0  a1  c0     B and D add nothing: x2 predicts their one token
        pos        0   1   2   3   4   3     C restarts at 3, where the context ends
        segment    0   0   0   1   1   3     0: context, j + 1: ending j (-1: padding, none here)

    The mask: a query sees a key if the key's pos is not later and the key is context or in the
    query's own segment. Padding is in no segment, so no one sees it; it sits at pos 0 and so sees
    x0, which keeps every softmax row non-empty (an empty one would give NaN).

        key:      x0  x1  x2  a0  a1  c0
        query x0   1   .   .   .   .   .
              x1   1   1   .   .   .   .
              x2   1   1   1   .   .   .
              a0   1   1   1   1   .   .
              a1   1   1   1   1   1   .
              c0   1   1   1   .   .   1     as in the plain row x0 x1 x2 c0 c1: the context and itself

    Four lists say what to score. predictors: the columns whose logits are computed, as b * T +
    column in the flattened batch (row b = 0 here): [2, 3, 4, 5]. The other three are parallel,
    one entry per target, that is, per ending token:

        targets   a0  a1  a2  b0  c0  c1  d0
        source     0   1   2   0   0   3   0     which predictor scores it: an index into predictors
        row_of     0   0   0   1   2   2   3     4 * b + j: the ending whose loss it adds to

    so x2 (predictors[0]) scores the first token of all four endings, a0 scores a1, a1 scores a2
    and c0 scores c1."""
    B, T = len(batch), max(packed_length(ctx, endings) for ctx, endings, _ in batch)
    tokens = torch.zeros(B, T, dtype=torch.long)  # (B, T), padded with 0
    pos = torch.zeros(B, T, dtype=torch.long)  # (B, T), the position embedding each token gets
    segment = torch.full((B, T), -1)  # (B, T): 0 context, j + 1 ending j, -1 padding
    predictors, source, targets, row_of = [], [], [], []  # see the worked example above
    for b, (ctx, endings, _) in enumerate(batch):
        n_ctx = len(ctx)
        tokens[b, :n_ctx], pos[b, :n_ctx], segment[b, :n_ctx] = torch.tensor(ctx), torch.arange(n_ctx), 0
        last_ctx = len(predictors)  # the index in predictors of the last context token, which predicts
        predictors.append(b * T + n_ctx - 1)  # the first token of every ending
        column = n_ctx  # where the next ending's tokens go
        for j, ending in enumerate(endings):
            fed = len(ending) - 1  # the ending's tokens that go into the row: all but the last
            tokens[b, column : column + fed] = torch.tensor(ending[:-1])
            pos[b, column : column + fed] = torch.arange(n_ctx, n_ctx + fed)  # restart after the context
            segment[b, column : column + fed] = j + 1
            source += [last_ctx] + list(range(len(predictors), len(predictors) + fed))
            predictors += range(b * T + column, b * T + column + fed)
            targets += ending
            row_of += [NUM_ENDINGS * b + j] * len(ending)
            column += fed
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]  # (B, T, 1) for queries, (B, 1, T) for keys
    mask = (pos[:, None, :] <= pos[:, :, None]) & ((k_seg == 0) | (k_seg == q_seg)) & (k_seg >= 0)  # (B, T, T)
    tokens, pos, mask = tokens.to(device), pos.to(device), mask.to(device)
    h = model.hidden_states(tokens, pos=pos, attn_mask=mask[:, None])[0]  # (B, T, C); one mask for all heads
    logits = model.logits(h.view(B * T, -1)[torch.tensor(predictors, device=device)]).float()  # (P, vocab)
    source, targets = torch.tensor(source, device=device), torch.tensor(targets, device=device)  # (N,) each
    nll = torch.logsumexp(logits, dim=-1)[source] - logits[source, targets]  # (N,): cross-entropy of each target
    summed = torch.zeros(B * NUM_ENDINGS, device=device).index_add_(0, torch.tensor(row_of, device=device), nll)
    summed = summed.view(B, NUM_ENDINGS)
    lengths = torch.tensor([[len(e) for e in endings] for _, endings, _ in batch], device=device)  # (B, 4)
    return summed, summed / lengths


def score_examples(model, examples, device, batch_size=32, autocast_dtype=None, progress=False, should_stop=None):
    """(summed, mean) loss of every ending, float32 CPU tensors (len(examples), 4), in input order;
    None if should_stop() (looked at before each batch) turns true: the rest is not scored."""
    if model.config.vocab_size < gpt2_tokenizer().n_vocab:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than GPT-2's tokenizer's")
    encoded = [encode_example(ex, model.config.block_size) for ex in examples]
    summed = torch.empty(len(examples), NUM_ENDINGS)
    mean = torch.empty(len(examples), NUM_ENDINGS)
    with inference(model, device, autocast_dtype), tqdm(total=len(examples), disable=not progress,
                                                        desc="hellaswag", unit="ex") as bar:
        for indices in _batches(encoded, batch_size):
            if should_stop is not None and should_stop():
                return None
            batch_summed, batch_mean = _score_batch(model, [encoded[i] for i in indices], device)
            summed[indices], mean[indices] = batch_summed.cpu(), batch_mean.cpu()
            bar.update(len(indices))
    return summed, mean


def evaluate(model, examples, device, batch_size=32, rank=0, world_size=1, autocast_dtype=None,
             progress=False, return_predictions=False, should_stop=None):
    """acc and acc_norm of model on examples; rank r scores examples[r::world_size] and, under
    torch.distributed, the counts of all ranks are summed. With return_predictions, the result also
    has "predictions": (index, pred, pred_norm) for each example this rank scored. should_stop: this
    rank's own flag (no collective per batch: ranks score different numbers of batches), looked at
    before each batch; if it turns true on any rank, every rank returns None (the flag travels in
    the one all_reduce of the counts)."""
    if not examples:
        raise ValueError("no examples to evaluate")
    mine = range(rank, len(examples), world_size)  # indices of this rank's share
    scores = score_examples(model, [examples[i] for i in mine], device, batch_size, autocast_dtype,
                            progress and rank == 0, should_stop)
    if scores is None:  # stopped: count nothing, tell the other ranks
        counts = torch.tensor([0, 0, 0, 1], device=device)
    else:
        summed, mean = scores
        labels = torch.tensor([examples[i]["label"] for i in mine], dtype=torch.long)
        pred, pred_norm = summed.argmin(dim=1), mean.argmin(dim=1)  # ties: the first, as in the plain loop
        counts = torch.tensor([len(mine), (pred == labels).sum(), (pred_norm == labels).sum(), 0], device=device)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    n, correct, correct_norm, stopped = counts.tolist()
    if stopped:
        return None
    acc, acc_norm = (correct / n, correct_norm / n) if n else (math.nan, math.nan)  # a rank with no examples
    result = dict(n=n, correct=correct, correct_norm=correct_norm, acc=acc, acc_norm=acc_norm)
    if return_predictions:
        result["predictions"] = list(zip(mine, pred.tolist(), pred_norm.tolist()))
    return result


# ---------------------------------------------------------------- command line


def positive_int(s):
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return int(s)


def main(argv=None):
    p = argparse.ArgumentParser(description="HellaSwag accuracy (completion style) of a GPT-2 model.")
    p.add_argument("-m", "--model", default="gpt2", help="an OpenAI size (gpt2, gpt2-medium, gpt2-large, gpt2-xl), "
                   "a Hugging Face save_pretrained directory, or a train_gpt2.py checkpoint (default: gpt2)")
    p.add_argument("--split", default="val", choices=SPLITS, help="split to download and evaluate (default: val)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where splits are downloaded (default: hellaswag/)")
    p.add_argument("--data-file", help="evaluate this local jsonl (official schema) instead of a downloaded split")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, ... "
                   "(default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="examples per forward pass (default: 32)")
    p.add_argument("--limit", type=positive_int, help="only the first N examples (default: all)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="autocast dtype; auto: bfloat16 on CUDA and on a CPU with native bfloat16 (1.65x faster "
                   "there, BENCHMARKS.md), else float32. float32 gives the reference numbers exactly; bfloat16 "
                   "rounds, and may flip a near-tie (default: auto)")
    args = p.parse_args(argv)

    try:
        device = utils.usable_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from model import GPT

    try:
        autocast_dtype = utils.autocast_dtype(torch.device(device).type, args.dtype)
    except ValueError as e:  # a bad GPT2_CPU_BF16
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        model = GPT.from_pretrained(args.model)
    except (ValueError, OSError) as e:
        print(f"error: -m {args.model}: {e}", file=sys.stderr)
        return 2
    try:  # after the model: its block size decides which examples fit
        examples = load_examples(args.split, args.cache_dir, args.data_file, block_size=model.config.block_size)
    except HellaSwagUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.to(device)

    t0 = time.perf_counter()
    result = evaluate(model, examples[: args.limit], device, args.batch_size, autocast_dtype=autocast_dtype,
                      progress=True)
    seconds = time.perf_counter() - t0
    print(f"examples   {result['n']}")
    print(f"acc        {result['acc']:.4f}  ({result['correct']}/{result['n']})")
    print(f"acc_norm   {result['acc_norm']:.4f}  ({result['correct_norm']}/{result['n']})")
    print(f"examples/s {result['n'] / seconds:.1f}  ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    utils.keep_freed_memory()  # as train_gpt2.py does: the process keeps the logits' freed memory (CPU)
    sys.exit(main())
