"""dataloader.py: every token once per epoch in a new order, world-size invariance, exact resume
state, flat memory. Shards come from conftest.write_shards: every non-EOT token id is unique, so a
token seen twice or never is easy to spot."""
import json
import os
import resource
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest
import torch

import dataloader
from conftest import ROOT, SHAKESPEARE, write_shards
from dataloader import DataError, DataLoader, data_sources
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


def test_a_text_files_paragraphs_are_the_documents_it_shuffles(tmp_path):
    # A .txt holds no <|endoftext|>. Read in file order, the Shakespeare demo learned one play after
    # another and its val loss (the last plays) rose and fell with the play it had just read.
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    speeches = [f"SPEAKER{i}:\nThe {i}th speech,\nin two lines.\n" for i in range(60)]
    path = tmp_path / "play.txt"
    path.write_text("\n".join(speeches), encoding="utf-8")  # a blank line between speeches
    (train, *_), _ = data_sources(str(path))
    tokens = train[1]
    # the reference: cut the train tokens wherever the text before ends with a blank line, and the
    # next token is no newline (found by decoding, not by the loader's token ids)
    cuts = [i for i in range(1, len(tokens)) if enc.decode(tokens[:i].tolist()).endswith("\n\n")
            and not enc.decode(tokens[i:i + 1].tolist()).startswith("\n")]
    documents = np.split(tokens, cuts)
    assert len(documents) >= 50  # the 90% cut leaves most speeches in train
    n = len(tokens)
    epoch = consume(DataLoader([train], B=2, T=8, grad_accum_steps=2, seed=5), steps=n // 32 + 1)[:n]
    where = epoch.astype("<u2").tobytes()
    found = [where.find(d.astype("<u2").tobytes()) for d in documents]
    assert all(f >= 0 and f % 2 == 0 for f in found)  # each speech whole, in one piece
    assert sum(len(d) for d in documents) == n and np.array_equal(np.sort(epoch), np.sort(tokens))
    assert found != sorted(found)  # in a new order


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
    shard_len = 1_000_000
    rng = np.random.default_rng(0)
    for i in range(4):
        tokens = rng.integers(0, EOT, shard_len).astype(np.uint16)
        tokens[::1000] = EOT  # 1000-token documents
        np.save(tmp_path / f"edufineweb_train_{i + 1:06d}.npy", tokens)
    files = sorted(str(p) for p in tmp_path.glob("*.npy"))
    B, T = 8, 512
    tracemalloc.start()
    loader = DataLoader(files, B=B, T=T, seed=0)
    per_shard = []
    for shard in range(9):  # two full epochs and a bit
        tracemalloc.reset_peak()
        for _ in range(shard_len // (B * T) + 1):
            loader.next_batch()
        loader.next_shard.result()  # measure with the next shard ready, not at some moment of its build
        per_shard.append(tracemalloc.get_traced_memory())
    tracemalloc.stop()
    shard_bytes = 2 * shard_len  # one uint16 copy of a shard
    for current, peak in per_shard:
        assert current < 2.3 * shard_bytes  # the current shard and the next one (prepared ahead), never more
        assert peak < 3 * shard_bytes  # while the next one is built; an int64 copy alone would be 4x
    assert per_shard[-1][0] < per_shard[1][0] + 0.1 * shard_bytes  # no growth over time


def test_a_shard_shorter_than_a_batch_is_read_like_any_other(tmp_path):
    """fineweb.py's last shard can be any length: batches simply run on into the next shard."""
    train, _ = data_sources(write_shards(str(tmp_path / "data"), [300, 300, 20, 350]))
    n = sum(len(np.load(f)) for f in train)  # 670
    loader = DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=5)
    stream = consume(loader, steps=2 * n // 32 + 1)
    for epoch in (stream[:n], stream[n:2 * n]):
        assert np.array_equal(np.sort(epoch), np.sort(np.concatenate([np.load(f) for f in train])))


# ---------------------------------------------------------------- what a resume refuses


def txt_shard(tokens):
    """The (name, tokens) pair data_sources makes of a .txt file's first 90%."""
    return ("data/input.txt (first 90%)", np.asarray(tokens, dtype=np.uint16))


def test_a_txt_checkpoint_from_before_the_paragraph_shuffle_is_refused(tmp_path):
    # A checkpoint of the previous version read the text in file order (no "documents" in its state):
    # resumed on shuffled paragraphs, the rest of its epoch would skip text and repeat other text.
    path = tmp_path / "play.txt"
    path.write_text("\n".join(f"SPEAKER{i}:\nThe {i}th speech.\n" for i in range(60)), encoding="utf-8")
    (train, *_), _ = data_sources(str(path))
    loader = DataLoader([train], B=2, T=8, grad_accum_steps=2, seed=1)
    consume(loader, steps=3)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["documents"] == ["paragraphs"]
    DataLoader([train], B=2, T=8, grad_accum_steps=2, seed=1).load_state_dict(state)  # this version's: fine
    del state["documents"]
    with pytest.raises(DataError, match="paragraphs"):
        DataLoader([train], B=2, T=8, grad_accum_steps=2, seed=1).load_state_dict(state)
    # shards cut at EOTs (fineweb.py's) resume from such an older checkpoint as before
    eot_shard = ("shard", np.concatenate([[EOT], train[1][:500]]).astype(np.uint16))
    old = DataLoader([eot_shard], B=2, T=8, grad_accum_steps=2, seed=1)
    consume(old, steps=3)
    state = json.loads(json.dumps(old.state_dict()))
    del state["documents"]
    DataLoader([eot_shard], B=2, T=8, grad_accum_steps=2, seed=1).load_state_dict(state)


def test_resume_refuses_data_that_changed_naming_the_shard(shards, tmp_path):
    tokens = np.load(data_sources(shards)[0][0])
    loader = DataLoader([txt_shard(tokens)], B=2, T=8, grad_accum_steps=2, seed=1)
    consume(loader, steps=5)
    state = json.loads(json.dumps(loader.state_dict()))
    shortened = DataLoader([txt_shard(tokens[:100])], B=2, T=8, grad_accum_steps=2, seed=1)
    with pytest.raises(DataError) as e:
        shortened.load_state_dict(state)  # before: accepted, and next_batch looped forever
    assert all(s in str(e.value) for s in ("input.txt (first 90%)", "300 tokens", "100"))

    # a shard directory: one shard changed length, or was replaced by another file
    data = write_shards(str(tmp_path / "data"), [300, 400, 300, 250])
    train, _ = data_sources(data)
    loader = DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=1)
    consume(loader, steps=3)
    state = json.loads(json.dumps(loader.state_dict()))
    np.save(train[1], np.load(train[1])[:200])  # edufineweb_train_000002.npy: 300 tokens -> 200
    with pytest.raises(DataError) as e:
        DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=1).load_state_dict(state)
    assert all(s in str(e.value) for s in ("edufineweb_train_000002.npy", "300 tokens", "200"))
    os.rename(train[1], train[1].replace("000002", "000005"))
    moved, _ = data_sources(data)
    with pytest.raises(DataError) as e:
        DataLoader(moved, B=2, T=8, grad_accum_steps=2, seed=1).load_state_dict(state)
    assert "edufineweb_train_000002.npy" in str(e.value) and "edufineweb_train_000005.npy" in str(e.value)


def test_a_checkpoint_of_the_previous_version_still_resumes_and_a_bad_position_is_an_error(shards):
    """The previous version's state had no record of the data: it resumes as before, and a position
    past the end of the data is an error, not an endless loop."""
    train, _ = data_sources(shards)
    reference = consume(DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=1), steps=40)
    loader = DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=1)
    consume(loader, steps=30)
    old = {k: loader.state_dict()[k] for k in ("epoch", "shard", "offset", "pending", "num_shards")}
    resumed = DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=1)
    resumed.load_state_dict(old)
    assert np.array_equal(consume(resumed, steps=10), reference[30 * 32:])
    for bad in (dict(offset=10_000), dict(offset=-1), dict(shard=4), dict(epoch=-1)):
        with pytest.raises(DataError, match="the data changed"):  # before: accepted, then an endless loop
            DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=1).load_state_dict({**old, **bad})


def test_resume_refuses_another_seed_or_total_batch_size(shards):
    train, _ = data_sources(shards)
    loader = DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=1337)
    consume(loader, steps=3)
    state = loader.state_dict()
    with pytest.raises(DataError, match="--seed 1337 -> 7"):
        DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=7).load_state_dict(state)
    with pytest.raises(DataError, match="--total-batch-size 32 -> 64"):
        DataLoader(train, B=2, T=8, grad_accum_steps=4, seed=1337).load_state_dict(state)
    with pytest.raises(DataError, match="shuffle"):
        DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=1337, shuffle=False).load_state_dict(state)


def test_resume_with_another_world_size_and_the_same_total_is_exact(shards):
    """1 rank x 4 micro-steps, resumed as 2 ranks x 2 micro-steps (or B=4 x 1 micro-step x 2 ranks):
    a step sees the same tokens whatever the world size, so the resumed stream is the reference's."""
    train, _ = data_sources(shards)
    single = dict(B=2, T=8, grad_accum_steps=4, seed=3)
    reference = consume(DataLoader(train, **single), steps=40)  # 64 tokens a step
    for k, (B, accum) in ((7, (2, 2)), (20, (4, 1))):
        loader = DataLoader(train, **single)
        consume(loader, steps=k)
        state = json.loads(json.dumps(loader.state_dict()))
        ranks = [DataLoader(train, B=B, T=8, rank=r, world_size=2, grad_accum_steps=accum, seed=3) for r in range(2)]
        for rank in ranks:
            rank.load_state_dict(state)
        stream = []
        for _ in range(40 - k):
            for _ in range(accum):  # micro-step m of rank r is slice m * world_size + r of the window
                stream += [rank.next_batch()[0].flatten() for rank in ranks]
        assert np.array_equal(torch.cat(stream).numpy(), reference[k * 64:])


def test_train_gpt2_resuming_on_a_shortened_txt_is_an_error_not_a_hang(tmp_path):
    """The issue's report: train on a .txt, shorten it, resume. Before, the resumed run spun at 100%
    CPU with memory growing until killed; now it stops at once with an error naming the data."""
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    data = tmp_path / "input.txt"
    data.write_text(text[:10_000], encoding="utf-8")
    args = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--data", str(data), "--n-layer", "1",
            "--n-head", "2", "--n-embd", "32", "--seq-len", "16", "--batch-size", "2", "--total-batch-size", "64",
            "--no-hellaswag", "--num-samples", "0", "--eval-every", "0", "--val-tokens", "32",
            "--log-dir", str(tmp_path / "log"), "--max-steps", "20"]

    def limit_memory():  # a regression would grow memory without end: let it fail, not fill the machine
        resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, 4 << 30))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    data.write_text(text[:2_000], encoding="utf-8")
    (train,), _ = data_sources(str(data))
    assert len(train[1]) < 20 * 64 + 1  # the checkpoint's position (step 20) is past the new data's end
    resumed = subprocess.run([*args, "--max-steps", "25", "--resume", "auto"], capture_output=True, text=True,
                             timeout=120, preexec_fn=limit_memory, env=env)
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert "error: " in resumed.stderr and "input.txt (first 90%)" in resumed.stderr
    assert f"{len(train[1]):,}" in resumed.stderr


# ---------------------------------------------------------------- what the loader checks at start


def write_manifest(directory, entries):
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump({"shard_size": 400, "shards": entries, "complete": True}, f)


def test_a_bad_token_id_in_the_last_shard_fails_at_construction(tmp_path):
    data = write_shards(str(tmp_path / "data"), [300, 300, 300, 300])
    train, _ = data_sources(data)
    bad = np.load(train[-1])
    bad[123] = 50300
    np.save(train[-1], bad)
    with pytest.raises(DataError) as e:  # before: only when the run reached that shard, hours later
        DataLoader(train, B=2, T=8, shuffle=False, vocab_size=50257)  # unshuffled: shard 1 comes first
    assert train[-1] in str(e.value) and "token id 50300" in str(e.value)
    # an in-memory shard (a .txt's tokens) too
    with pytest.raises(DataError, match="token id 50300"):
        DataLoader([txt_shard(bad)], B=2, T=8, seed=0, vocab_size=50257)


def test_shards_the_manifest_vouches_for_are_not_read_and_the_others_are(tmp_path):
    """Vouched shards are trusted without reading them: their data is garbage (ids past the
    vocabulary) here, and construction still succeeds; a shard the manifest does not vouch for
    (not listed, another token count, or an older manifest without max_token) is read in full."""
    data = write_shards(str(tmp_path / "data"), [300, 300, 300, 300])
    train, _ = data_sources(data)
    garbage = np.full(300, 60000, dtype=np.uint16)  # same header and length, unusable ids
    entries = []
    for f in train:
        np.save(f, garbage)
        entries.append({"file": os.path.basename(f), "tokens": 300, "max_token": 50256, "start": [0, 0], "end": [0, 0]})
    write_manifest(data, entries)
    assert DataLoader(train, B=2, T=8, seed=0).num_tokens == 900  # not read: the garbage went unseen
    older = [dict(e) for e in entries]
    del older[1]["max_token"]  # a manifest written before fineweb.py recorded max_token
    recounted = [dict(e) for e in entries]
    recounted[0]["tokens"] = 299  # the manifest describes another file than this one
    unlisted = entries[:2]  # the third shard is not listed
    for manifest, shard in ((older, 1), (recounted, 0), (unlisted, 2)):
        write_manifest(data, manifest)
        with pytest.raises(DataError) as e:
            DataLoader(train, B=2, T=8, seed=0)
        assert train[shard] in str(e.value) and "token id 60000" in str(e.value)
    # a listed shard whose max_token is past the vocabulary fails at once, naming the shard and the id
    write_manifest(data, [{**e, "max_token": 50300} if i == 2 else e for i, e in enumerate(entries)])
    with pytest.raises(DataError) as e:
        DataLoader(train, B=2, T=8, seed=0)
    assert train[2] in str(e.value) and "token id 50300" in str(e.value)


# ---------------------------------------------------------------- the document shuffle


def old_shuffled_shard(tokens, seed, epoch, index):
    """The previous version's document shuffle (a slice per document): the reference order, which
    exact resume across versions depends on."""
    starts = np.flatnonzero(tokens == EOT)
    bounds = np.concatenate([[0], starts[starts > 0], [len(tokens)]])
    perm = np.random.default_rng([seed, epoch, index]).permutation(len(bounds) - 1)
    return np.concatenate([tokens[bounds[j]: bounds[j + 1]] for j in perm])


@pytest.mark.parametrize("chunk", [None, 7, 64])
def test_the_document_shuffle_gives_the_previous_versions_order(chunk, tmp_path, monkeypatch):
    """The whole stream, over 3 epochs, equals the one the previous version's slice-and-concatenate
    shuffle gives: shard orders, document orders, a first shard starting mid-document, a shard of
    one document, documents longer than the chunks the vectorised copy works in."""
    if chunk:
        monkeypatch.setattr(dataloader, "CHUNK", chunk)
    data = write_shards(str(tmp_path / "data"), [50, 400, 300, 250, 350], doc_len=25)
    one_doc = np.arange(1000, 1200, dtype=np.uint16)
    one_doc[0] = EOT
    np.save(tmp_path / "data" / "edufineweb_train_000005.npy", one_doc)
    train, _ = data_sources(data)
    seed, n = 11, 1500
    reference = []
    for epoch in range(3):
        order = np.random.default_rng([seed, epoch]).permutation(len(train))
        reference += [old_shuffled_shard(np.load(train[i]), seed, epoch, i) for i in order]
    reference = np.concatenate(reference)
    stream = consume(DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=seed), steps=3 * n // 32)
    assert np.array_equal(stream, reference[: len(stream)])


# ---------------------------------------------------------------- the next shard, prepared in the background


def test_the_next_shard_is_built_off_the_training_thread(shards, monkeypatch):
    """After the first shard, every shard switch finds its shard prepared by the background thread:
    the training thread builds none itself (before: it built every one, ~1 s per 100M tokens)."""
    train, _ = data_sources(shards)
    builds, real = [], DataLoader._build  # (loader, thread) of each shard built (other tests' loaders aside)
    monkeypatch.setattr(DataLoader, "_build", lambda self, *a: builds.append((self, threading.current_thread()))
                        or real(self, *a))
    for prefetch in (True, False):
        loader = DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=5, prefetch=prefetch)
        consume(loader, steps=3 * 900 // 32)  # three epochs: 8 shard switches
        if prefetch:
            loader.next_shard.result()  # the last prefetch, started at the last switch, has run too
        threads = [thread for who, thread in builds if who is loader]
        on_main = threads.count(threading.main_thread())
        # 9 shards visited (with prefetch, and the 10th prepared); on the training thread: only the first
        assert (len(threads), on_main) == ((10, 1) if prefetch else (9, 9))


def test_a_shard_that_changes_under_the_run_is_an_error_when_reached(tmp_path):
    """An error while preparing a shard in the background reaches the training thread as a
    DataError when that shard is needed (not a hang, not a silent switch to other data)."""
    data = write_shards(str(tmp_path / "data"), [300, 300, 300, 300, 300])
    train, _ = data_sources(data)
    loader = DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=5)
    third = train[loader.order[2]]  # not opened yet: the prefetch has the second one
    np.save(third, np.load(third)[:250])
    with pytest.raises(DataError) as e:
        consume(loader, steps=1200 // 32)
    assert third in str(e.value) and "300" in str(e.value) and "250" in str(e.value)


def test_jumping_between_positions_and_resets_gives_the_reference_stream(shards):
    """load_state_dict and reset move the loader elsewhere: the shard being prepared for the old
    position must not be used for the new one (same shard index, another epoch, included)."""
    train, _ = data_sources(shards)
    reference_loader = DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=9)
    states, reference = [], []
    for _ in range(90):  # > 3 epochs
        states.append(reference_loader.state_dict())
        reference.append(consume(reference_loader, steps=1))
    loader = DataLoader(train, B=2, T=8, grad_accum_steps=2, seed=9)
    for k in np.random.default_rng(0).integers(0, 85, 25):
        loader.load_state_dict(states[k])
        assert np.array_equal(consume(loader, steps=5), np.concatenate(reference[k:k + 5]))
        if k % 3 == 0:
            loader.reset()
            assert np.array_equal(consume(loader, steps=2), np.concatenate(reference[:2]))
