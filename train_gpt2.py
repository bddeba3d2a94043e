"""Train GPT-2 (124M) from scratch on FineWeb-edu with GPT-3's recipe, on one device or many.

    python fineweb.py                                        # once: FineWeb-edu -> edu_fineweb10B/ shards
    torchrun --standalone --nproc_per_node=8 train_gpt2.py   # 8 GPUs: 19,073 steps of 524,288 tokens = 10B
    python train_gpt2.py                                     # the same run on one device
    python train_gpt2.py --preset shakespeare                # a first run: tiny model, Tiny Shakespeare, any CPU
    python train_gpt2.py --resume auto                       # continue from the newest checkpoint in --log-dir

Each optimizer step sees --total-batch-size tokens: every rank runs grad_accum_steps micro-batches of
--batch-size x --seq-len tokens, and DDP averages the gradients across ranks once per step. The
learning rate warms up linearly, then decays along a cosine to 10% of its peak. Every --eval-every
steps: validation loss, HellaSwag accuracy and a few samples. A checkpoint holds everything needed to
continue exactly where the run stopped; SIGTERM or Ctrl-C finishes the step and writes one.
"""
import argparse
import contextlib
import dataclasses
import datetime
import functools
import glob
import json
import math
import os
import random
import re
import signal
import sys
import time
import urllib.request

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import EOT, GPT, OPENAI_SIZES, GPTConfig

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
PRESETS = {  # named sets of defaults; flags given on the command line still win
    # a first run on any machine: a 4-layer model learns Tiny Shakespeare in a few minutes on 2 CPU cores
    "shakespeare": dict(data="input.txt", n_layer=4, n_head=4, n_embd=128, seq_len=128, batch_size=8,
                        total_batch_size=1024, max_steps=200, warmup_steps=20, lr=2e-3, eval_every=50,
                        sample_every=0, val_tokens=8192, hellaswag=False, num_samples=1, sample_tokens=64,
                        sample_prompt="ROMEO:", checkpoint_every=0, log_dir="log/shakespeare"),
}


class TrainError(Exception):
    """Bad input (a flag, the data, a checkpoint): main prints the message and exits with status 2."""


def _count(min_value):
    def parse(text):
        if not text.lstrip("-").isdigit() or int(text) < min_value:
            raise argparse.ArgumentTypeError(f"expected an integer >= {min_value}, got {text!r}")
        return int(text)
    return parse


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: ...)", except for flags that are off by default
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=_Help)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), help="start from a named set of defaults (flags you give still win): "
      "shakespeare = a 4-layer model on Tiny Shakespeare, minutes on a CPU")
    a("--data", default="edu_fineweb10B", help="a directory of uint16 .npy shards (*_train_*, *_val_*) from "
      "fineweb.py, or a .txt file tokenized at start (first 90%% train, last 10%% val)")
    a("--model", default="gpt2", choices=list(OPENAI_SIZES), help="model shape: one of OpenAI's (gpt2 = 124M)")
    a("--n-layer", type=_count(1), help="override the number of layers of --model")
    a("--n-head", type=_count(1), help="override the number of attention heads of --model")
    a("--n-embd", type=_count(1), help="override the embedding width of --model")
    a("--padded-vocab-size", type=_count(0), default=50304, help="embedding rows; 50304 (a multiple of 128) "
      "is faster than the real 50257; 0 = no padding")
    a("--init-from", help="fine-tune: start from an OpenAI size (gpt2, ...), a Hugging Face directory or a "
      "checkpoint file instead of random weights (the shape flags are then ignored)")
    a("--batch-size", type=_count(1), default=64, help="micro-batch: sequences per rank per forward pass "
      "(if memory runs out, lower it: the accumulation grows, the total batch stays)")
    a("--seq-len", type=_count(1), default=1024, help="tokens per sequence (and a new model's block size)")
    a("--total-batch-size", type=_count(1), default=524288, help="tokens per optimizer step, all ranks and "
      "micro-steps together: a multiple of batch-size x seq-len x world size")
    a("--max-steps", type=_count(1), default=19073, help="optimizer steps (19,073 x 524,288 tokens = 10B)")
    a("--warmup-steps", type=_count(0), default=715, help="steps of linear learning-rate warmup")
    a("--lr", type=float, default=6e-4, help="peak learning rate")
    a("--min-lr-ratio", type=float, default=0.1, help="the cosine ends at --lr times this, at --max-steps")
    a("--weight-decay", type=float, default=0.1, help="AdamW weight decay of matrices and embeddings only")
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this; 0 = no clipping")
    a("--eval-every", type=_count(0), default=250, help="val loss and HellaSwag every N steps and at the end "
      "(0: at the end only)")
    a("--val-tokens", type=_count(1), default=20 * 524288, help="tokens per val loss: always the first ones of "
      "the val data, rounded down to whole batch-size x seq-len x world-size batches")
    a("--hellaswag", action=argparse.BooleanOptionalAction, default=True, help="HellaSwag acc_norm at each eval "
      "(downloaded once into hellaswag/; skipped with one line if unavailable)")
    a("--hellaswag-file", help="a local HellaSwag .jsonl to evaluate instead of the downloaded val split")
    a("--sample-every", type=_count(0), default=250, help="print samples every N steps and at the end "
      "(0: at the end only)")
    a("--num-samples", type=_count(0), default=4, help="samples per rank each time")
    a("--sample-tokens", type=_count(1), default=32, help="new tokens per sample")
    a("--sample-prompt", default="Hello, I'm a language model,", help="the prompt the samples continue")
    a("--checkpoint-every", type=_count(0), default=5000, help="checkpoint every N steps, and always at the "
      "end and on SIGTERM/SIGINT")
    a("--keep-checkpoints", type=_count(1), default=3, help="keep only the newest K checkpoints in --log-dir")
    a("--log-dir", default="log", help="where log.jsonl and the checkpoints ckpt_NNNNNN.pt go")
    a("--resume", help="'auto': from the newest checkpoint in --log-dir (if any); or a checkpoint file")
    a("--seed", type=_count(0), default=1337, help="seeds the initial weights, the data order and sampling")
    a("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, mps; under torchrun "
      "each rank takes cuda:LOCAL_RANK")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast dtype: auto = "
      "bfloat16 on CUDA, else float32 (weights and optimizer state are float32 always)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model for "
      "training (default: on with CUDA; elsewhere off: it needs a C++ compiler and starts slowly)")
    a("--peak-tflops", type=float, default=989.0, help="one device's dense bf16 peak, for MFU "
      "(H100/H200 SXM: 989, A100: 312)")
    args = p.parse_args(argv)
    if args.preset:  # parse again with the preset as defaults, so that explicit flags still win
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)
    return args


# ---------------------------------------------------------------- learning rate


def get_lr(step, args):
    """Linear warmup to --lr over --warmup-steps, then a cosine down to lr * min_lr_ratio at --max-steps."""
    max_lr, min_lr = args.lr, args.lr * args.min_lr_ratio
    if step < args.warmup_steps:
        return max_lr * (step + 1) / args.warmup_steps  # step 0 already learns a little
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


# ---------------------------------------------------------------- data


def data_sources(path):
    """(train, val) shards of --data: lists of .npy paths, or for a .txt one (name, tokens) pair each."""
    if path.endswith(".txt"):
        if not os.path.exists(path) and os.path.basename(path) == "input.txt":
            download_shakespeare(path)
        import tiktoken

        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise TrainError(f"--data {path}: cannot read it as UTF-8 text ({e})") from e
        tokens = np.array(tiktoken.get_encoding("gpt2").encode_ordinary(text), dtype=np.uint16)
        cut = len(tokens) * 9 // 10
        return [(f"{path} (first 90%)", tokens[:cut])], [(f"{path} (last 10%)", tokens[cut:])]
    if not os.path.isdir(path):
        raise TrainError(f"--data {path}: no such directory. Run `python fineweb.py` first to download and "
                         "tokenize FineWeb-edu into it (or try --preset shakespeare for a small first run)")
    files = sorted(glob.glob(os.path.join(path, "*.npy")))
    train = [f for f in files if "_train_" in os.path.basename(f)]
    val = [f for f in files if "_val_" in os.path.basename(f)]
    for split, found in (("train", train), ("val", val)):
        if not found:
            raise TrainError(f"--data {path}: no {split} shards (*_{split}_*.npy). Run `python fineweb.py` "
                             "to write them")
    return train, val


def download_shakespeare(path):
    print(f"{path} not found: downloading Tiny Shakespeare from {SHAKESPEARE_URL}", flush=True)
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            data = response.read()
    except OSError as e:  # urllib's errors are OSErrors
        raise TrainError(f"--data {path} does not exist and downloading it failed ({e}). Offline? Fetch "
                         f"{SHAKESPEARE_URL} to {path} by hand, or pass --data FILE.txt") from e
    tmp = f"{path}.{os.getpid()}.tmp"  # one temporary name per process: ranks may all download at once
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class DataLoader:
    """Micro-batches from one endless token stream: the shards one after another, epoch after epoch.

    With shuffle, each epoch visits the shards in a new order and each shard's documents (every one
    starts with EOT) in a new order, both drawn from (seed, epoch): an unshuffled run shows loss bumps
    at shard boundaries. Batches cross shard and epoch boundaries, so no token is skipped or repeated.
    Optimizer step s reads the next window of B*T*world*accum tokens (plus one, the last target), and
    micro-step m of rank r takes slice m*world + r of it: a step sees the same tokens whatever the
    world size. Shards stay memory-mapped; only the current one is held as a (uint16) permuted copy."""

    def __init__(self, shards, B, T, rank=0, world_size=1, grad_accum_steps=1, shuffle=True, seed=0,
                 vocab_size=50257, device="cpu"):
        self.shards, self.B, self.T, self.rank, self.world_size = shards, B, T, rank, world_size
        self.accum, self.shuffle, self.seed, self.vocab_size = grad_accum_steps, shuffle, seed, vocab_size
        self.device = torch.device(device)
        self.step_tokens = B * T * world_size * grad_accum_steps
        # open every shard now (headers only) so that a bad file fails at start, not hours into the run
        self.num_tokens = sum(len(self._open(i)[1]) for i in range(len(shards)))
        need = B * T * world_size + 1  # a batch may span shards, but the data must hold one
        if self.num_tokens < need:
            raise TrainError(f"{shards[0] if isinstance(shards[0], str) else shards[0][0]}"
                             f"{f' and {len(shards) - 1} more shard(s)' if len(shards) > 1 else ''}: "
                             f"{self.num_tokens:,} tokens, fewer than one batch-size x seq-len x world-size "
                             f"slice + 1 = {need:,}; lower --batch-size or --seq-len, or use more data")
        self.reset()

    def _open(self, i):
        """Shard i as (name, 1-D uint16 array); a file is memory-mapped, never read whole into memory."""
        if isinstance(self.shards[i], tuple):
            name, tokens = self.shards[i]
        else:
            name = self.shards[i]
            try:
                tokens = np.load(name, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise TrainError(f"{name}: unreadable shard ({e}); write it again with `python fineweb.py`") from e
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise TrainError(f"{name}: a {tokens.ndim}-D {tokens.dtype} array; token shards must be 1-D uint16 "
                             "(as fineweb.py writes them)")
        if len(tokens) == 0:
            raise TrainError(f"{name}: an empty shard; write it again with `python fineweb.py`, or delete it")
        return name, tokens

    def _set_position(self, epoch, shard, offset):
        self.epoch, self.shard, self.offset = epoch, shard, offset
        n = len(self.shards)
        self.order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        self.tokens = None  # release the previous shard before building the next one: memory stays flat
        name, tokens = self._open(self.order[shard])
        if int(tokens.max()) >= self.vocab_size:  # one pass over the memory map, once per shard
            raise TrainError(f"{name}: token id {int(tokens.max())} >= vocab size {self.vocab_size}")
        if self.shuffle:
            starts = np.flatnonzero(tokens == EOT)
            bounds = np.concatenate([[0], starts[starts > 0], [len(tokens)]])  # a first partial document too
            perm = np.random.default_rng([self.seed, epoch, int(self.order[shard])]).permutation(len(bounds) - 1)
            tokens = np.concatenate([tokens[bounds[j]: bounds[j + 1]] for j in perm])
        self.tokens = tokens

    def _take(self, n):
        """A copy of the next n tokens of the stream, moving on to the next shard or epoch as needed."""
        parts = []
        while n > 0:
            parts.append(np.array(self.tokens[self.offset: self.offset + n]))
            self.offset += len(parts[-1])
            n -= len(parts[-1])
            if self.offset == len(self.tokens):
                last_shard = self.shard + 1 == len(self.shards)
                self._set_position(self.epoch + last_shard, 0 if last_shard else self.shard + 1, 0)
        return np.concatenate(parts)

    def reset(self):
        """Back to the start of epoch 0 (the validation loader does this before every eval)."""
        self._set_position(0, 0, 0)
        self.pending, self.micro = int(self._take(1)[0]), 0  # pending: the first input of the next window

    def state_dict(self):
        """The stream position between optimizer steps, as plain ints (for checkpoints)."""
        return dict(epoch=self.epoch, shard=self.shard, offset=self.offset, pending=self.pending,
                    num_shards=len(self.shards))

    def load_state_dict(self, state):
        if state["num_shards"] != len(self.shards):
            raise TrainError(f"the checkpoint's data had {state['num_shards']} shards, --data has {len(self.shards)}")
        self._set_position(state["epoch"], state["shard"], state["offset"])
        self.pending, self.micro = state["pending"], 0

    def next_batch(self):
        """This rank's next micro-batch: inputs x and targets y (x shifted by one), (B, T) int64 on the device."""
        if self.micro == 0:
            new = self._take(self.step_tokens)
            self.window = np.concatenate([np.array([self.pending], dtype=np.uint16), new])
            self.pending = int(new[-1])
        BT, i = self.B * self.T, self.micro * self.world_size + self.rank
        buf = torch.from_numpy(self.window[i * BT: i * BT + BT + 1].astype(np.int64))  # only B*T+1 tokens
        self.micro = (self.micro + 1) % self.accum
        if self.device.type == "cuda":  # from pinned memory the copy is asynchronous: no host-device sync
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        else:
            buf = buf.to(self.device)
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)


# ---------------------------------------------------------------- model, training step, evaluation


def setup_distributed(device_arg):
    """(rank, world_size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this
    is a single process. NCCL links CUDA devices; gloo lets CPUs (and tests) run DDP too."""
    env = {k: int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1))}
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device {device_arg}: no CUDA device is available (try --device cpu)")
        device = torch.device("cuda", env["LOCAL_RANK"] if device.index is None else device.index)
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return env["RANK"], env["WORLD_SIZE"], device


def build_model(args, device):
    """A new GPT of the requested shape (seeded by the caller), or pretrained weights with --init-from."""
    try:
        if args.init_from:
            model = GPT.from_pretrained(args.init_from, padded_vocab_size=args.padded_vocab_size)
        else:
            shape = {**OPENAI_SIZES[args.model],
                     **{k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd") if getattr(args, k)}}
            model = GPT(GPTConfig(block_size=args.seq_len, padded_vocab_size=args.padded_vocab_size, **shape))
    except (ValueError, OSError) as e:
        raise TrainError(f"{'--init-from ' + args.init_from if args.init_from else 'model shape'}: {e}") from e
    if args.seq_len > model.config.block_size:
        raise TrainError(f"--seq-len {args.seq_len} is longer than the model's block size {model.config.block_size}")
    return model.to(device)


def autocast(device, dtype):
    """Matmuls in dtype (bfloat16), weights and reductions in float32; dtype None = plain float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_step(model, optimizer, loader, grad_accum_steps, lr, grad_clip=1.0, autocast_dtype=None):
    """One optimizer step over grad_accum_steps micro-batches from loader. Returns (mean loss over all
    micro-steps and ranks, gradient norm) as device tensors: nothing here waits for the device, so the
    host keeps queueing work ahead of it (the caller reads the two numbers once, to log them)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = 0.0
    for micro in range(grad_accum_steps):
        x, y = loader.next_batch()
        # DDP would all-reduce gradients after every backward; only the step's last one needs it
        sync = micro == grad_accum_steps - 1 or not isinstance(model, DDP)
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast(x.device, autocast_dtype):
                _, loss = model(x, y)
            loss = loss / grad_accum_steps  # the accumulated gradient is then that of the mean loss
            loss.backward()
        loss_sum = loss_sum + loss.detach()
    if dist.is_initialized():  # log the mean over all ranks, not only this rank's
        dist.all_reduce(loss_sum)
        loss_sum = loss_sum / dist.get_world_size()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, norm


@torch.no_grad()
def val_loss(model, loader, steps, autocast_dtype=None):
    """Mean loss over the first `steps` val batches: the same tokens at every eval, split across ranks."""
    loader.reset()
    total = torch.zeros((), device=loader.device)
    for _ in range(steps):
        x, y = loader.next_batch()
        with autocast(x.device, autocast_dtype):
            total += model(x, y)[1].float()
    if dist.is_initialized():
        dist.all_reduce(total)
        total /= dist.get_world_size()
    return (total / steps).item()


def on_rank0(fn):
    """fn() run by rank 0 alone, and its result, or the error it raised (as a TrainError), given to
    every rank: so all ranks take the same branch, and none waits in a collective that another one
    skipped (also when each node has its own disk, and only rank 0's has the file)."""
    result, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn()
        except TrainError as e:
            error = str(e)
        except Exception as e:  # anything else too: the other ranks must not wait for a broadcast
            if not dist.is_initialized():
                raise
            error = f"on rank 0: {type(e).__name__}: {e}"
    if dist.is_initialized():
        box = [result, error]
        dist.broadcast_object_list(box, src=0)
        result, error = box
    if error:
        raise TrainError(error)
    return result


def load_hellaswag(args):
    """HellaSwag val examples, or None (after one line saying why) when off or unavailable. Rank 0
    calls this (downloading once); on_rank0 sends the examples to the other ranks."""
    if not args.hellaswag:
        return None
    import hellaswag

    try:
        return hellaswag.load_examples("val", data_file=args.hellaswag_file)
    except hellaswag.HellaSwagUnavailable as e:
        print(f"hellaswag: skipped ({e}; in train_gpt2.py that is --hellaswag-file)", flush=True)
        return None
    except (OSError, ValueError) as e:
        raise TrainError(f"HellaSwag data: {e} (pass --hellaswag-file FILE or --no-hellaswag)") from e


def print_samples(model, args, device, rank, autocast_dtype=None):
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    prompt = torch.tensor([enc.encode_ordinary(args.sample_prompt)] * args.num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed + rank)  # each rank its own samples
    with autocast(device, autocast_dtype):
        out = model.generate(prompt, args.sample_tokens, top_k=50, generator=generator)
    for i, row in enumerate(out.tolist()):
        print(f"rank {rank} sample {i}: {enc.decode(row)}", flush=True)


# ---------------------------------------------------------------- checkpoints and log


def checkpoints(log_dir):
    """This script's checkpoints in log_dir (ckpt_NNNNNN.pt), oldest first; other files are ignored."""
    found = [f for f in glob.glob(os.path.join(log_dir, "ckpt_*.pt"))
             if re.fullmatch(r"ckpt_\d{6,}\.pt", os.path.basename(f))]  # not a ckpt_best.pt of the user's
    return sorted(found, key=checkpoint_step)


def save_checkpoint(args, step, raw_model, optimizer, loader):
    ckpt = dict(model=raw_model.state_dict(), config=dataclasses.asdict(raw_model.config),
                optimizer=optimizer.state_dict(), step=step, loader=loader.state_dict(), args=vars(args),
                rng=dict(torch=torch.get_rng_state(), python=random.getstate(),
                         cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []))
    path = os.path.join(args.log_dir, f"ckpt_{step:06d}.pt")
    with open(path + ".tmp", "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: a machine crash cannot leave a truncated file
    os.replace(path + ".tmp", path)  # a crash mid-write never leaves a broken file under the real name
    for old in checkpoints(args.log_dir)[:-args.keep_checkpoints]:
        os.remove(old)
    return path


def checkpoint_step(path):
    return int(os.path.basename(path)[len("ckpt_"):-len(".pt")])


def find_checkpoint(args):
    """The checkpoint to resume from, or None for a fresh run; refuses what would mix two runs in
    --log-dir: a fresh run beside old checkpoints, or a resume from a step older than some of them
    (pruning and a later --resume auto would then pick up the abandoned run's files)."""
    found = checkpoints(args.log_dir)
    if args.resume is None:
        if found:
            raise TrainError(f"--log-dir {args.log_dir} holds checkpoints of an earlier run (newest: {found[-1]}): "
                             "continue it with --resume auto, or use another --log-dir")
        return None
    if args.resume == "auto":
        if not found:
            print(f"no checkpoint in {args.log_dir}: starting from step 0", flush=True)
        return found[-1] if found else None
    if not os.path.isfile(args.resume):
        raise TrainError(f"--resume {args.resume}: no such file (give a checkpoint file, or 'auto')")
    try:  # memory-mapped: reads the step without loading the weights
        step = torch.load(args.resume, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception as e:
        raise TrainError(f"--resume {args.resume}: not a readable train_gpt2.py checkpoint ({e!r})") from e
    later = [f for f in found if checkpoint_step(f) > step]
    if later:
        raise TrainError(f"--resume {args.resume} continues from step {step}, but --log-dir {args.log_dir} holds "
                         f"later checkpoints ({', '.join(map(os.path.basename, later))}) of the run it leaves: "
                         "move them away, or use another --log-dir")
    return args.resume


def load_checkpoint(path, raw_model, optimizer, loader):
    """Restore everything a checkpoint holds; returns the number of steps it had completed."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["model"], ckpt["config"], ckpt["step"]  # noqa: B018 (a KeyError if it is not ours)
    except Exception as e:  # a truncated file, another format, ...: all the same to the user
        raise TrainError(f"--resume {path}: not a readable train_gpt2.py checkpoint ({e!r})") from e
    want = dataclasses.asdict(raw_model.config)
    if ckpt["config"] != want:
        shape = lambda c: ", ".join(f"{k}={v}" for k, v in c.items())  # noqa: E731
        raise TrainError(f"--resume {path}: the checkpoint holds a model with {shape(ckpt['config'])}, but this "
                         f"run asks for {shape(want)}. Pass the same shape flags, or use another --log-dir")
    raw_model.load_state_dict(ckpt["model"])
    # the checkpoint gives the optimizer's state (moments, step counts); this run's flags give its
    # settings: load_state_dict alone would bring back the old weight decay, and fused=False from a CPU
    state = ckpt["optimizer"]
    state["param_groups"] = [{**old, **{k: v for k, v in new.items() if k != "params"}}
                             for old, new in zip(state["param_groups"], optimizer.state_dict()["param_groups"])]
    optimizer.load_state_dict(state)
    loader.load_state_dict(ckpt["loader"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    if torch.cuda.is_available() and len(ckpt["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"]


def trim_log(path, start_step):
    """log.jsonl is an append log; a run starting at step k keeps the records of earlier steps only
    (and drops a last line cut short by a crash)."""
    lines = open(path).readlines() if os.path.exists(path) else []
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] < start_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def append_log(path, **record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- main


STOP = {"signal": None}  # set by a SIGTERM/SIGINT handler; the loop stops at the end of the step


def _request_stop(signum, frame):
    # Only a flag: a scheduler may signal torchrun and every worker at once, and torchrun passes its
    # signal on too, so one preemption can arrive twice; each must still end in a checkpoint.
    STOP["signal"] = signum


def main(argv=None):
    args = parse_args(argv)
    STOP["signal"] = None
    handlers = {s: signal.signal(s, _request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return train(args)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args):
    rank, world_size, device = setup_distributed(args.device)
    master = rank == 0  # rank 0 prints, logs and writes checkpoints
    say = functools.partial(print, flush=True) if master else lambda *a, **k: None
    autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16,
                      "auto": torch.bfloat16 if device.type == "cuda" else None}[args.dtype]
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the matmuls autocast leaves in float32

    B, T = args.batch_size, args.seq_len
    if args.total_batch_size % (B * T * world_size):
        raise TrainError(f"--total-batch-size {args.total_batch_size:,} is not a multiple of --batch-size {B} x "
                         f"--seq-len {T} x world size {world_size} = {B * T * world_size:,}")
    accum = args.total_batch_size // (B * T * world_size)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw_model = build_model(args, device)
    config = raw_model.config
    train_shards, val_shards = data_sources(args.data)
    train_loader = DataLoader(train_shards, B, T, rank, world_size, accum, shuffle=True, seed=args.seed,
                              vocab_size=config.vocab_size, device=device)
    val_loader = DataLoader(val_shards, B, T, rank, world_size, 1, shuffle=False, vocab_size=config.vocab_size,
                            device=device)
    val_steps = min(args.val_tokens, val_loader.num_tokens - 1) // (B * T * world_size)
    if val_steps == 0:
        raise TrainError(f"--val-tokens {args.val_tokens:,}: val loss needs at least one batch-size x seq-len x "
                         f"world-size batch of {B * T * world_size:,} tokens (the val data holds "
                         f"{val_loader.num_tokens:,})")
    optimizer = raw_model.configure_optimizers(args.weight_decay, args.lr, device.type, verbose=master)

    start_step, ckpt = 0, on_rank0(lambda: find_checkpoint(args))  # rank 0 writes --log-dir: it decides
    if ckpt:
        if dist.is_initialized():  # every rank reads the checkpoint rank 0 found
            seen = torch.tensor(float(os.path.isfile(ckpt)), device=device)
            dist.all_reduce(seen, op=dist.ReduceOp.MIN)
            if not seen.item():
                raise TrainError(f"{ckpt}: rank 0 resumes from it, but not every rank can read it; with several "
                                 "nodes, --log-dir must be on a filesystem that all of them share")
        start_step = load_checkpoint(ckpt, raw_model, optimizer, train_loader)
        say(f"resumed from {ckpt} at step {start_step}")

    # The training step runs the compiled model, wrapped in DDP. Val loss reuses the compiled model
    # (same shapes, so one extra graph for no_grad, no recompilation). Sampling and HellaSwag feed
    # ever-changing shapes (prompt lengths, KV cache): compiled, they would recompile again and again,
    # so they run raw_model, the plain module, which shares the very same weight tensors.
    compiled = torch.compile(raw_model) if use_compile else raw_model
    model = compiled
    if world_size > 1:  # DDP averages the gradients across ranks during backward
        model = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None)
    examples = on_rank0(lambda: load_hellaswag(args))

    say(f"model: {raw_model.num_params():,} parameters (n_layer {config.n_layer}, n_head {config.n_head}, n_embd "
        f"{config.n_embd}, block {config.block_size}, vocab {config.vocab_size} padded to {config.padded_vocab_size})")
    say(f"data: {args.data}: {len(train_shards)} train shard(s), {train_loader.num_tokens:,} tokens; "
        f"val loss on {val_steps * B * T * world_size:,} tokens")
    say(f"batch: {B} x {T} = {B * T:,} tokens per micro-step x {world_size} rank(s) x {accum} accumulation "
        f"step(s) = {args.total_batch_size:,} tokens per step; {args.max_steps:,} steps = "
        f"{args.max_steps * args.total_batch_size:,} tokens")
    say(f"device: {device}, autocast {autocast_dtype or 'off (float32)'}, compile {'on' if use_compile else 'off'}")

    log_path = os.path.join(args.log_dir, "log.jsonl")
    if master:
        os.makedirs(args.log_dir, exist_ok=True)
        trim_log(log_path, start_step)
        for partial in glob.glob(os.path.join(args.log_dir, "ckpt_*.pt.tmp")):  # a save cut short by a kill
            os.remove(partial)
    dt_avg = None
    for step in range(start_step, args.max_steps + 1):
        last = step == args.max_steps
        if last or (args.eval_every and step % args.eval_every == 0):
            loss = val_loss(compiled, val_loader, val_steps, autocast_dtype)
            say(f"step {step:5d} | val loss {loss:.4f}")
            if master:
                append_log(log_path, step=step, val_loss=loss)
            if examples:
                import hellaswag

                r = hellaswag.evaluate(raw_model, examples, device, rank=rank, world_size=world_size,
                                       autocast_dtype=autocast_dtype)
                say(f"step {step:5d} | hellaswag acc_norm {r['acc_norm']:.4f} ({r['correct_norm']}/{r['n']})")
                if master:
                    append_log(log_path, step=step, hellaswag=r["acc_norm"])
        if step > 0 and args.num_samples and (last or (args.sample_every and step % args.sample_every == 0)):
            print_samples(raw_model, args, device, rank, autocast_dtype)
        if last:
            break

        t0 = time.perf_counter()
        lr = get_lr(step, args)
        loss, norm = train_step(model, optimizer, train_loader, accum, lr, args.grad_clip, autocast_dtype)
        stop = torch.full((), float(STOP["signal"] is not None), device=device)
        if dist.is_initialized():  # a signal to any one rank stops them all, after the same step
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        loss, norm, stop = torch.stack([loss.float(), norm.float(), stop]).tolist()  # the step's one sync
        dt = time.perf_counter() - t0
        if not (math.isfinite(loss) and math.isfinite(norm)):  # every rank sees the same numbers
            if master:
                print(f"error: step {step}: loss {loss}, gradient norm {norm}. Stopping without writing a "
                      "checkpoint, so the last good one stays the newest; try a lower --lr", file=sys.stderr)
            return 1
        dt_avg = dt if dt_avg is None or step == start_step + 1 else 0.9 * dt_avg + 0.1 * dt  # skip compile
        tok_per_s = args.total_batch_size / dt
        mfu = None if device.type != "cuda" else raw_model.estimate_mfu(tok_per_s / world_size, T,
                                                                        args.peak_tflops * 1e12)
        eta = datetime.timedelta(seconds=round((args.max_steps - step - 1) * dt_avg))
        say(f"step {step:5d}/{args.max_steps} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | "
            f"{dt * 1000:.1f} ms | {tok_per_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu is not None else "") +
            f" | ETA {eta}")
        if master:
            append_log(log_path, step=step, train_loss=loss, lr=lr, norm=norm, dt_ms=dt * 1000,
                       tok_per_s=tok_per_s, mfu=mfu)
        done = step + 1
        if stop or done == args.max_steps or (args.checkpoint_every and done % args.checkpoint_every == 0):
            path = save_checkpoint(args, done, raw_model, optimizer, train_loader) if master else None
            if dist.is_initialized():
                dist.barrier()  # nobody exits before the checkpoint is on disk
            say(f"checkpoint: {path}")
        if stop:
            say(f"stopped by a signal after step {step}; continue with --resume auto")
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
