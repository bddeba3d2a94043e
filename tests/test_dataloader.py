"""dataloader.py: every token once per epoch in a new order, world-size invariance, exact resume
state, flat memory. Shards come from conftest.write_shards: every non-EOT token id is unique, so a
token seen twice or never is easy to spot."""
import json
import tracemalloc

import numpy as np
import pytest
import torch

from conftest import write_shards
from dataloader import DataLoader, data_sources
from model import EOT


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")), [400, 300, 250, 350])


def consume(loader, steps):
    """The input stream a loader produced over `steps` optimizer steps, checking targets on the way."""
    xs = []
    for _ in range(steps * loader.grad_accum_steps):
        x, y = loader.next_batch()
        assert x.dtype == torch.int64 and x.shape == (loader.B, loader.T)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        xs.append((x, y))
    if not xs:
        return np.zeros(0, dtype=np.int64)
    stream = torch.cat([x.flatten() for x, _ in xs]).numpy()
    last_targets = np.array([y.flatten()[-1].item() for _, y in xs])
    ends = np.cumsum([x.numel() for x, _ in xs])
    assert np.array_equal(stream[ends[:-1]], last_targets[:-1])  # each batch's last target opens the next
    return stream


def test_loader_covers_every_token_once_per_epoch_in_a_new_order(shards):
    train, _ = data_sources(shards)
    data = [np.load(f) for f in train]
    n = sum(len(d) for d in data)  # 900 tokens; 2 x 8 x 2 accumulation = 32 tokens per step
    loader = DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=5)
    stream = consume(loader, steps=3 * n // 32 + 1)
    everything = np.sort(np.concatenate(data))
    epochs = [stream[e * n:(e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert np.array_equal(np.sort(epoch), everything)  # each token exactly once: none skipped or repeated
        where = {int(t): i for i, t in enumerate(epoch) if t != EOT}
        for d in data:  # documents stay whole: consecutive tokens of a document stay consecutive
            doc_starts = set(np.flatnonzero(d == EOT))
            for j in range(1, len(d)):
                if j not in doc_starts and d[j - 1] != EOT:
                    assert where[int(d[j])] == where[int(d[j - 1])] + 1
                elif d[j - 1] == EOT and j not in doc_starts:  # and a document's EOT still precedes it
                    assert epoch[where[int(d[j])] - 1] == EOT
    # shuffled, and differently each epoch: the order of the shards, and of each shard's documents
    wheres = [{int(t): i for i, t in enumerate(epoch) if t != EOT} for epoch in epochs]
    shard_order = [np.argsort([where[int(d[d != EOT][0])] for d in data]).tolist() for where in wheres]
    assert shard_order[0] != shard_order[1] or shard_order[1] != shard_order[2]
    for d in data:
        # the token after each EOT identifies its document (documents with no other token aside)
        firsts = [int(d[j + 1]) for j in np.flatnonzero(d[:-1] == EOT) if d[j + 1] != EOT]
        doc_order = [np.argsort([where[t] for t in firsts]).tolist() for where in wheres]
        identity = list(range(len(firsts)))
        assert doc_order[0] != identity and doc_order[0] != doc_order[1] and doc_order[1] != doc_order[2]
    again = consume(DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=5), steps=10)
    assert np.array_equal(again, stream[: len(again)])  # the order is a function of the seed


def test_a_step_sees_the_same_tokens_whatever_the_world_size(shards):
    train, _ = data_sources(shards)
    single = DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=3)
    ranks = [DataLoader(train, B=2, T=8, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(40):  # > 2 epochs
        one = [single.next_batch() for _ in range(2)]
        two = [rank.next_batch() for rank in ranks]
        for (x1, y1), (x2, y2) in zip(one, two):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_loader_state_resumes_the_exact_stream(shards):
    train, val = data_sources(shards)
    reference = consume(DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=1), steps=70)
    for k in (0, 9, 28, 31, 57):  # positions inside shards, at shard ends and past epoch ends
        loader = DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=1)
        consume(loader, steps=k)
        state = json.loads(json.dumps(loader.state_dict()))  # plain ints only
        resumed = DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=1)
        resumed.load_state_dict(state)
        assert np.array_equal(consume(resumed, steps=70 - k), reference[k * 32:])
    val_loader = DataLoader(val, B=2, T=8, shuffle=False)
    first = consume(val_loader, steps=5)
    assert np.array_equal(first, np.load(val[0])[:80])  # val: the file's first tokens, in order
    val_loader.reset()
    assert np.array_equal(consume(val_loader, steps=5), first)  # the same tokens at every eval


def test_loader_memory_stays_flat_across_shards(tmp_path):
    shard_len = 200_000
    rng = np.random.default_rng(0)
    for i in range(4):
        tokens = rng.integers(0, EOT, shard_len).astype(np.uint16)
        tokens[::1000] = EOT  # 1000-token documents
        np.save(tmp_path / f"edufineweb_train_{i + 1:06d}.npy", tokens)
    files = sorted(str(p) for p in tmp_path.glob("*.npy"))
    B, T = 4, 256
    tracemalloc.start()
    loader = DataLoader(files, B=B, T=T, seed=0)
    per_shard = []
    for shard in range(9):  # two full epochs and a bit
        tracemalloc.reset_peak()
        for _ in range(shard_len // (B * T) + 1):
            loader.next_batch()
        per_shard.append(tracemalloc.get_traced_memory())
    tracemalloc.stop()
    shard_bytes = 2 * shard_len  # one uint16 copy of a shard
    for current, peak in per_shard:
        assert current < 1.3 * shard_bytes  # holds about one shard, never more
        assert peak < 2.5 * shard_bytes  # while switching shards; an int64 copy alone would be 4x
    assert per_shard[-1][0] < per_shard[1][0] + 0.1 * shard_bytes  # no growth over time


def test_a_shard_shorter_than_a_batch_is_read_like_any_other(tmp_path):
    """fineweb.py's last shard can be any length: batches simply run on into the next shard."""
    train, _ = data_sources(write_shards(str(tmp_path / "data"), [300, 300, 20, 350]))
    n = sum(len(np.load(f)) for f in train)  # 670
    loader = DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=5)
    stream = consume(loader, steps=2 * n // 32 + 1)
    for epoch in (stream[:n], stream[n:2 * n]):
        assert np.array_equal(np.sort(epoch), np.sort(np.concatenate([np.load(f) for f in train])))
