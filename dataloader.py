"""The training data: token shards on disk -> (x, y) micro-batches, the same on every run and resumable.

The walkthrough's DataLoaderLite, grown up: shards are memory-mapped (never read whole into memory),
each epoch visits them and their documents in a new shuffled order, and the position in the stream
is a few integers that a checkpoint stores, so a resumed run reads exactly the tokens the
uninterrupted run would have read.
"""
import glob
import os

import numpy as np
import torch

from model import EOT
from utils import download

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


class DataError(Exception):
    """Unusable data (a missing directory, a bad shard, a checkpoint of other data): train_gpt2.py
    prints the message and exits with status 2."""


def data_sources(path):
    """(train, val) shards of --data: lists of .npy paths, or for a .txt file one (name, tokens) pair each."""
    if path.endswith(".txt"):
        if not os.path.exists(path) and os.path.basename(path) == "input.txt":
            print(f"{path} not found: downloading Tiny Shakespeare from {SHAKESPEARE_URL}", flush=True)
            try:
                download(SHAKESPEARE_URL, path, timeout=30)
            except OSError as e:
                raise DataError(f"--data {path} does not exist and downloading it failed ({e}). Offline? Fetch "
                                f"{SHAKESPEARE_URL} to {path} by hand, or pass --data FILE.txt") from e
        import tiktoken

        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"--data {path}: cannot read it as UTF-8 text ({e})") from e
        tokens = np.array(tiktoken.get_encoding("gpt2").encode_ordinary(text), dtype=np.uint16)
        cut = len(tokens) * 9 // 10
        return [(f"{path} (first 90%)", tokens[:cut])], [(f"{path} (last 10%)", tokens[cut:])]
    if not os.path.isdir(path):
        raise DataError(f"--data {path}: no such directory. Run `python fineweb.py` first to download and "
                        "tokenize FineWeb-edu into it (or try --preset shakespeare for a small first run)")
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.npy")))  # the user's path, taken literally
    train = [f for f in files if "_train_" in os.path.basename(f)]
    val = [f for f in files if "_val_" in os.path.basename(f)]
    for split, found in (("train", train), ("val", val)):
        if not found:
            raise DataError(f"--data {path}: no {split} shards (*_{split}_*.npy). Run `python fineweb.py` to write them")
    return train, val


def open_shard(shard):
    """(name, 1-D uint16 array) of a .npy path (memory-mapped: nothing is read yet) or a (name, array) pair."""
    if isinstance(shard, tuple):
        name, tokens = shard
    else:
        name = shard
        try:
            tokens = np.load(name, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{name}: unreadable shard ({e}); write it again with `python fineweb.py`") from e
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise DataError(f"{name}: a {tokens.ndim}-D {tokens.dtype} array; token shards must be 1-D uint16 "
                        "(as fineweb.py writes them)")
    if len(tokens) == 0:
        raise DataError(f"{name}: an empty shard; write it again with `python fineweb.py`, or delete it")
    return name, tokens


class DataLoader:
    """Micro-batches from one endless token stream: the shards one after another, epoch after epoch.

    Optimizer step s reads the next window of B*T*world_size*grad_accum_steps tokens of the stream,
    and the token before it (carried over from the previous window: `pending`). Micro-step m of rank
    r takes slice m*world_size + r of the window; its inputs x start one token earlier than its
    targets y. With B=2, T=4, 2 ranks and 2 micro-steps, a window is 32 tokens:

        stream   ... p | t1 .. t8 | t9 .. t16 | t17 .. t24 | t25 .. t32 | t33 ...   (p = pending)
        slice          |    0     |     1     |     2      |     3      |
        who            | micro 0  |  micro 0  |  micro 1   |  micro 1   |
                       | rank 0   |  rank 1   |  rank 0    |  rank 1    |

        slice 0:  x = [[p  t1 t2 t3],     y = [[t1 t2 t3 t4],
                       [t4 t5 t6 t7]]          [t5 t6 t7 t8]]

    t32 is the next window's pending token. So every token is a target exactly once, and a step sees
    the same 32 tokens whatever the world size: with 1 rank and 4 micro-steps, micro-step m takes slice m.

    With shuffle, each epoch visits the shards in a new order, and each shard's documents (each one
    starts with EOT) in a new order, both drawn from (seed, epoch): an unshuffled run shows loss
    bumps at shard boundaries. Windows cross shard and epoch boundaries: nothing is skipped or repeated.
    Only the current shard is held in memory, as a (uint16) permuted copy."""

    def __init__(self, shards, B, T, rank=0, world_size=1, grad_accum_steps=1, shuffle=True, seed=0,
                 vocab_size=50257, device="cpu"):
        self.shards, self.B, self.T, self.rank, self.world_size = shards, B, T, rank, world_size
        self.grad_accum_steps, self.shuffle, self.seed = grad_accum_steps, shuffle, seed
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self.step_tokens = B * T * world_size * grad_accum_steps
        # every shard is opened now (headers only): a bad file fails at start, not hours into the run
        self.num_tokens = sum(len(open_shard(s)[1]) for s in shards)
        need = B * T * world_size + 1  # a batch may span shards, but the data must hold one
        if self.num_tokens < need:
            first = shards[0] if isinstance(shards[0], str) else shards[0][0]
            more = f" and {len(shards) - 1} more shard(s)" if len(shards) > 1 else ""
            raise DataError(f"{first}{more}: {self.num_tokens:,} tokens, fewer than one batch-size x seq-len x "
                            f"world-size slice + 1 = {need:,}; lower --batch-size or --seq-len, or use more data")
        self.reset()

    def reset(self):
        """Back to the start of epoch 0 (the validation loader does this before every eval)."""
        self._set_position(0, 0, 0)
        self.pending, self.micro_step = int(self._take(1)[0]), 0

    def next_batch(self):
        """This rank's next micro-batch: inputs x and targets y (x shifted by one), (B, T) int64 on the device."""
        if self.micro_step == 0:  # a new optimizer step: read its window (see the picture above)
            new = self._take(self.step_tokens)
            self.window = np.concatenate([np.array([self.pending], dtype=np.uint16), new])
            self.pending = int(new[-1])
        BT, i = self.B * self.T, self.micro_step * self.world_size + self.rank
        buf = torch.from_numpy(self.window[i * BT: i * BT + BT + 1].astype(np.int64))  # B*T + 1 tokens
        self.micro_step = (self.micro_step + 1) % self.grad_accum_steps
        if self.device.type == "cuda":  # from pinned memory the copy is asynchronous: no host-device sync
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        else:
            buf = buf.to(self.device)
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    def state_dict(self):
        """The stream position between optimizer steps, as plain ints (for checkpoints)."""
        return dict(epoch=self.epoch, shard=self.shard, offset=self.offset, pending=self.pending,
                    num_shards=len(self.shards))

    def load_state_dict(self, state):
        if state["num_shards"] != len(self.shards):
            raise DataError(f"the checkpoint's data had {state['num_shards']} shards, --data has {len(self.shards)}")
        self._set_position(state["epoch"], state["shard"], state["offset"])
        self.pending, self.micro_step = state["pending"], 0

    def _set_position(self, epoch, shard, offset):
        """Move to token `offset` of the shard-th shard (in this epoch's order) of epoch `epoch`."""
        self.epoch, self.shard, self.offset = epoch, shard, offset
        n = len(self.shards)
        self.order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        self.tokens = None  # release the previous shard before building the next one: memory stays flat
        name, tokens = open_shard(self.shards[self.order[shard]])
        if int(tokens.max()) >= self.vocab_size:  # one pass over the memory map, once per shard
            raise DataError(f"{name}: token id {int(tokens.max())} >= vocab size {self.vocab_size}")
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
