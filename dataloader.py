"""The training data: token shards on disk -> (x, y) micro-batches, the same on every run and resumable.

The walkthrough's DataLoaderLite, grown up: shards are memory-mapped (never read whole into memory),
each epoch visits them and their documents in a new shuffled order, and the position in the stream
is a few integers that a checkpoint stores, so a resumed run reads exactly the tokens the
uninterrupted run would have read.

Reading order: DataLoader (next_batch and its window, then state_dict / load_state_dict), then the
machinery: moving through the stream with the next shard prepared in a background thread, the
checks made once at start (check_shards), and the document shuffle (permute_documents).
"""
import glob
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from model import EOT
from utils import download

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
NEWLINE, BLANK_LINE = 198, 628  # GPT-2's tokens for "\n" and "\n\n"
CHUNK = 1 << 16  # tokens per piece of the vectorised shuffle: its int64 temporaries stay ~1 MB


class DataError(Exception):
    """Unusable data (a missing directory, a bad shard, a checkpoint of other data): train_gpt2.py
    prints the message and exits with status 2."""


def data_sources(path, need_train=True):
    """(train, val) shards of --data: lists of .npy paths, or for a .txt file one in-memory shard each:
    (name, tokens, paragraph starts) for train (see paragraph_starts), (name, tokens) for val.
    need_train=False (--eval-only) accepts a directory that holds only the val shard."""
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
        train = tokens[:cut]
        return [(f"{path} (first 90%)", train, paragraph_starts(train))], [(f"{path} (last 10%)", tokens[cut:])]
    if not os.path.isdir(path):
        raise DataError(f"--data {path}: no such directory. Run `python fineweb.py` first to download and "
                        "tokenize FineWeb-edu into it (or try --preset shakespeare for a small first run)")
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.npy")))  # the user's path, taken literally
    train = [f for f in files if "_train_" in os.path.basename(f)]
    val = [f for f in files if "_val_" in os.path.basename(f)]
    for split, found in (("train", train), ("val", val)):
        if not found and (split == "val" or need_train):
            raise DataError(f"--data {path}: no {split} shards (*_{split}_*.npy). Run `python fineweb.py` to write "
                            "them")
    return train, val


def paragraph_starts(tokens):
    """Where the paragraphs of a text start: at the first token after a blank line (GPT-2 encodes one
    as two "\\n" tokens before a word, or with a "\\n\\n" token). A .txt file has no <|endoftext|> to
    mark documents, so its paragraphs are what the shuffle reorders. In a play each is one speech:
    read in file order instead, the demo learned one play after another, and its val loss (the
    last plays) rose and fell with whichever play it had read last."""
    tokens = np.asarray(tokens)
    newline = np.isin(tokens, (NEWLINE, BLANK_LINE))
    # token i (i >= 2) starts a paragraph if it is no newline, and before it come either "\n\n" or
    # two newline tokens: with a = [i-2], b = [i-1], c = [i] for every i at once, the slices are
    #   a = newline[:-2], b = newline[1:-1], b is "\n\n" = tokens[1:-1] == BLANK_LINE, c = newline[2:]
    blank_before = newline[1:-1] & ((tokens[1:-1] == BLANK_LINE) | newline[:-2])
    return np.flatnonzero(~newline[2:] & blank_before) + 2


def open_shard(shard):
    """(name, 1-D uint16 array) of a .npy path (memory-mapped: nothing is read yet) or of an in-memory
    (name, array) or (name, array, document starts) tuple."""
    if isinstance(shard, tuple):
        name, tokens = shard[:2]
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
    Memory holds the current shard's permuted (uint16) copy and the next shard's, which a background
    thread prepares while training goes on (prefetch=False: prepared on the spot, at the switch).
    Unshuffled shards are used as they are on disk (memory-mapped): nothing to prepare."""

    def __init__(self, shards, B, T, rank=0, world_size=1, grad_accum_steps=1, shuffle=True, seed=0,
                 vocab_size=50257, device="cpu", prefetch=True):
        self.shards, self.B, self.T, self.rank, self.world_size = shards, B, T, rank, world_size
        self.grad_accum_steps, self.shuffle, self.seed = grad_accum_steps, shuffle, seed
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self.step_tokens = B * T * world_size * grad_accum_steps  # --total-batch-size
        # every shard is checked now (its header, and its token ids: see check_shards), so that a bad
        # one fails at start, not hours into the run; shard_tokens also tells a changed shard later
        self.names, self.shard_tokens = check_shards(shards, vocab_size)
        # where each shard's documents start for the shuffle: given (a .txt's paragraphs), or None (at EOTs)
        self.doc_starts = [s[2] if isinstance(s, tuple) and len(s) > 2 else None for s in shards]
        self.num_tokens = sum(self.shard_tokens)
        need = B * T * world_size + 1  # a batch may span shards, but the data must hold one
        if self.num_tokens < need:
            more = f" and {len(shards) - 1} more shard(s)" if len(shards) > 1 else ""
            raise DataError(f"{self.names[0]}{more}: {self.num_tokens:,} tokens, fewer than one batch-size x seq-len "
                            f"x world-size slice + 1 = {need:,}; lower --batch-size or --seq-len, or use more data")
        # one background thread prepares the next shard (numpy releases the GIL while it works)
        self.pool = ThreadPoolExecutor(max_workers=1) if prefetch and shuffle else None
        self.next_position, self.next_shard = None, None  # that shard's (epoch, shard), and its Future
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
        """The stream position between optimizer steps, and what defines the stream (the data, the
        seed, the tokens per step), as plain ints, strings and lists (for checkpoints)."""
        return dict(epoch=self.epoch, shard=self.shard, offset=self.offset, pending=self.pending,
                    num_shards=len(self.shards), seed=self.seed, shuffle=self.shuffle, step_tokens=self.step_tokens,
                    data=[[os.path.basename(name), n] for name, n in zip(self.names, self.shard_tokens)],
                    documents=self.documents())

    def documents(self):
        """How each shard is cut into documents for the shuffle, as a checkpoint records it."""
        return ["eot" if starts is None else "paragraphs" for starts in self.doc_starts]

    def load_state_dict(self, state):
        """Continue from a state_dict(): only on the same stream, or the resumed run would not be the
        interrupted one (tokens skipped or seen twice). A checkpoint of the previous version records
        the shard count alone; then only that, and the position, can be checked."""
        if "data" in state:
            self._check_same_stream(state)
        elif state["num_shards"] != len(self.shards):
            raise DataError(f"the checkpoint's data had {state['num_shards']} shards, --data has {len(self.shards)}")
        epoch, shard, offset = state["epoch"], state["shard"], state["offset"]
        if epoch < 0 or not 0 <= shard < len(self.shards):
            raise DataError(f"the checkpoint's data position (epoch {epoch}, shard {shard}) is not in --data's "
                            f"{len(self.shards)} shards: the data changed since it was written")
        self._set_position(epoch, shard, offset)
        self.pending, self.micro_step = state["pending"], 0

    def _check_same_stream(self, state):
        """DataError naming what differs between the checkpoint's stream and this loader's: the shards
        (names, token counts), the shuffle, the seed, the tokens per optimizer step."""
        data = [(name, n) for name, n in state["data"]]
        now = [(os.path.basename(name), n) for name, n in zip(self.names, self.shard_tokens)]
        if data != now:
            changes = [f"shard {i}: {old[0]} ({old[1]:,} tokens) -> {new[0]} ({new[1]:,} tokens)"
                       for i, (old, new) in enumerate(zip(data, now)) if old != new]
            if len(data) != len(now):
                changes.append(f"{len(data)} shards -> {len(now)}")
            more = f" and {len(changes) - 3} more changes" if len(changes) > 3 else ""
            raise DataError(f"--data is not the data the checkpoint was trained on: {'; '.join(changes[:3])}{more}. "
                            "Resume with the checkpoint's data, or start a fresh run in another --log-dir")
        if state["shuffle"] != self.shuffle:
            raise DataError(f"the checkpoint's loader had shuffle={state['shuffle']}, this one shuffle={self.shuffle}")
        if self.shuffle and state.get("documents", ["eot"] * len(data)) != self.documents():  # older: at EOTs only
            raise DataError("the checkpoint's loader shuffled documents cut at <|endoftext|> (a .txt file: none, so "
                            "its text was read in file order); this version shuffles a .txt file's paragraphs, and "
                            "the rest of the epoch would skip some text and repeat other text. Start a fresh run "
                            "(in another --log-dir), or resume with the version that wrote the checkpoint")
        if self.shuffle and state["seed"] != self.seed:
            raise DataError(f"--seed {state['seed']} -> {self.seed}: the checkpoint's data order was drawn from seed "
                            f"{state['seed']}, and with another one the rest of this epoch would skip some documents "
                            f"and repeat others. Resume with --seed {state['seed']}")
        if state["step_tokens"] != self.step_tokens:
            raise DataError(f"--total-batch-size {state['step_tokens']} -> {self.step_tokens}: the checkpoint's run "
                            f"reads {state['step_tokens']:,} tokens a step, and counts its steps, schedule and "
                            "--max-steps in such steps; with another size the resumed run is not that run. Resume with "
                            f"--total-batch-size {state['step_tokens']} (any --batch-size and number of GPUs "
                            "that multiply to it give the same stream)")

    # ------------------------------------------------------------ machinery: moving through the stream

    def _take(self, n):
        """A copy of the next n tokens of the stream, moving on to the next shard or epoch as needed."""
        parts = []
        while n > 0:
            part = np.array(self.tokens[self.offset: self.offset + n])
            if len(part) == 0:  # never loop without progress (_set_position keeps offset inside the shard)
                raise DataError(f"{self.names[self.order[self.shard]]}: no tokens at offset {self.offset:,}")
            parts.append(part)
            self.offset += len(part)
            n -= len(part)
            if self.offset == len(self.tokens):
                self._set_position(*self._following(self.epoch, self.shard), 0)
        return np.concatenate(parts)

    def _set_position(self, epoch, shard, offset):
        """Move to token `offset` of the shard-th shard (in this epoch's order) of epoch `epoch`."""
        self.epoch, self.shard = epoch, shard
        self.order = self._order(epoch)
        self.tokens = None  # release the previous shard first: memory holds two shards at most
        if self.next_position == (epoch, shard):  # prepared in the background (wait if it is not done yet)
            future, self.next_position, self.next_shard = self.next_shard, None, None
            self.tokens = future.result()  # an error it met is raised here, on the training thread
        else:  # the first shard, a jump (reset, load_state_dict), or no prefetch
            self._drop_prefetch()
            self.tokens = self._build(epoch, shard)
        if not 0 <= offset < len(self.tokens):
            raise DataError(f"the checkpoint's data position (token {offset:,} of "
                            f"{self.names[self.order[shard]]}) is past that shard's end ({len(self.tokens):,} "
                            "tokens): the data changed since it was written")
        self.offset = offset
        if self.pool is not None:  # start preparing the shard that comes after this one
            self.next_position = self._following(epoch, shard)
            self.next_shard = self.pool.submit(self._build, *self.next_position)

    def _drop_prefetch(self):
        """Forget the shard being prepared for a position the loader no longer goes to. A build that
        has started is waited for (its result and any error ignored): two shards at most, always."""
        if self.next_shard is not None and not self.next_shard.cancel():
            self.next_shard.exception()
        self.next_position, self.next_shard = None, None

    def _following(self, epoch, shard):
        """The (epoch, shard) after this one: the next shard of this epoch's order, or the next epoch's first."""
        return (epoch, shard + 1) if shard + 1 < len(self.shards) else (epoch + 1, 0)

    def _order(self, epoch):
        n = len(self.shards)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def _build(self, epoch, shard):
        """The shard-th shard of epoch `epoch`: its documents in this epoch's order (with shuffle), or
        the memory-mapped file itself. Runs on the background thread too: only reads self."""
        index = int(self._order(epoch)[shard])
        name, tokens = open_shard(self.shards[index])
        if len(tokens) != self.shard_tokens[index]:  # rewritten since the start: not the data checked then
            raise DataError(f"{name}: {len(tokens):,} tokens now, {self.shard_tokens[index]:,} when this run "
                            "started: a shard changed under the run. Restore it, then resume from the last checkpoint")
        if not self.shuffle:
            return tokens
        bounds = document_bounds(tokens, self.doc_starts[index])
        perm = np.random.default_rng([self.seed, epoch, index]).permutation(len(bounds) - 1)
        return permute_documents(tokens, bounds, perm)


# ------------------------------------------------------------ checks at start


def check_shards(shards, vocab_size):
    """(names, token counts) of the shards, after checking each one's header and token ids: an id >=
    vocab_size would fail in the embedding, hours into a run and again on every resume. A shard that
    fineweb.py's manifest.json (beside it) lists with the same token count and its largest id is
    trusted without reading it; any other shard is read once, in full (a progress bar when that is long)."""
    names, counts, unvouched = [], [], []
    manifests = {}  # directory -> {file name: its manifest entry}
    for shard in shards:
        name, tokens = open_shard(shard)  # for a file, its header only
        names.append(name)
        counts.append(len(tokens))
        entry = None
        if isinstance(shard, str):
            directory = os.path.dirname(shard)
            if directory not in manifests:
                manifests[directory] = manifest_entries(directory)
            entry = manifests[directory].get(os.path.basename(shard))
        if entry is None or entry.get("tokens") != len(tokens) or not isinstance(entry.get("max_token"), int):
            unvouched.append((shard, len(tokens)))  # not listed, listed for another file, or an older manifest
        elif entry["max_token"] >= vocab_size:
            raise DataError(f"{name}: token id {entry['max_token']} >= vocab size {vocab_size} (its manifest.json "
                            "entry's max_token): tokenized for another vocabulary? Write it again with "
                            "`python fineweb.py`")
    total = sum(n for _, n in unvouched)
    show = total > 50_000_000 and int(os.environ.get("RANK", "0")) == 0  # rank 0 only: one bar, not one per GPU
    with tqdm(total=total, unit="tok", unit_scale=True, desc="checking token ids (no manifest.json entry)",
              disable=not show) as bar:
        for shard, _ in unvouched:
            name, tokens = open_shard(shard)
            largest = max_token(tokens, bar)
            if largest >= vocab_size:
                raise DataError(f"{name}: token id {largest} >= vocab size {vocab_size}")
    return names, counts


def manifest_entries(directory):
    """{file name: entry} of fineweb.py's manifest.json in directory; {} when there is none or it is
    unreadable (the manifest only spares the reading of shards: without it, they are read)."""
    try:
        with open(os.path.join(directory, "manifest.json")) as f:
            return {entry["file"]: entry for entry in json.load(f)["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def max_token(tokens, bar=None):
    """The largest token id, read in 16M-token pieces (for the progress bar; a memory map: nothing is copied)."""
    largest = 0
    for i in range(0, len(tokens), 1 << 24):
        largest = max(largest, int(tokens[i:i + (1 << 24)].max()))
        if bar is not None:
            bar.update(min(1 << 24, len(tokens) - i))
    return largest


# ------------------------------------------------------------ the document shuffle


def document_bounds(tokens, starts=None):
    """[0, each document's start but the first, len(tokens)]: document j is tokens[bounds[j]:bounds[j+1]].
    Each EOT starts a document, unless the data gives the starts itself (a .txt file's paragraphs).
    A shard may begin mid-document: its first piece, up to the first EOT, counts as a document too.
    Searched CHUNK tokens at a time: no shard-sized boolean temporary."""
    if starts is None:
        starts = np.concatenate([np.flatnonzero(tokens[i:i + CHUNK] == EOT) + i
                                 for i in range(0, len(tokens), CHUNK)])
    return np.concatenate([[0], starts[starts > 0], [len(tokens)]])


def permute_documents(tokens, bounds, perm):
    """The documents in the order perm, as one new array: the same as
    np.concatenate([tokens[bounds[j]:bounds[j + 1]] for j in perm]), without a Python slice per
    document (that was 4-7x slower, the more so the shorter the documents: bench_dataloader.py).
    Each output position p of document k (in the new order) copies tokens[p + shift[k]]; the index
    is built CHUNK positions at a time, so its int64 temporaries stay small."""
    lengths = np.diff(bounds)[perm]  # the documents' lengths, in their new order
    ends = np.cumsum(lengths)  # where each one ends in the output
    shift = bounds[:-1][perm] - (ends - lengths)  # its start in tokens minus its start in the output
    out = np.empty(len(tokens), dtype=tokens.dtype)
    for a in range(0, len(tokens), CHUNK):
        b = min(a + CHUNK, len(tokens))
        first, last = np.searchsorted(ends, [a, b - 1], side="right")  # the documents that cover out[a:b]
        docs = slice(first, last + 1)
        counts = np.minimum(ends[docs], b) - np.maximum(ends[docs] - lengths[docs], a)  # their parts in a..b
        index = np.arange(a, b)
        index += np.repeat(shift[docs], counts)
        out[a:b] = tokens[index]
    return out
