"""hellaswag.py against an independent reference: Hugging Face's GPT2LMHeadModel scoring each ending
on its own, one unpadded row at a time, with a hand-written cross-entropy. Fixtures are written
here in the official schema (never copied from the dataset); the model has random weights."""
import functools
import json
import math
import os
import random
import re

import pytest
import tiktoken
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import GPT2Config, GPT2LMHeadModel

import hellaswag
import utils
from hellaswag import (HellaSwagUnavailable, encode_example, evaluate, load_examples, render_example,
                       score_examples, score_naive)
from model import GPT

BLOCK_SIZE = 48  # small, so that some fixture contexts must be truncated
WORDS = ("the a man woman dog child ball park kitchen knife onion guitar river boat rope hat shoes "
         "runs jumps cuts plays sits waves smiles throws paddles ties slowly quickly then again red blue "
         "and with into over under while he she they it is are").split()


def sentence(rng, lo, hi):
    words = rng.choices(WORDS, k=rng.randint(lo, hi))
    return " ".join(words).capitalize() + rng.choice([".", "!", ",", ""])


def example(ind, ctx, endings, label):
    """An example in the official HellaSwag schema (all fields, though scoring reads only three)."""
    return dict(ind=ind, activity_label="Testing", ctx_a=ctx, ctx_b="", ctx=ctx, split="val",
                split_type="indomain", endings=endings, source_id=f"test~{ind}", label=label)


def x_tokens(n):
    """Text whose " " + text is exactly n GPT-2 tokens: " x" n times."""
    return " ".join(["x"] * n)


def make_examples(n=30, seed=0):
    rng = random.Random(seed)
    examples = [example(i, sentence(rng, 2, 14), [sentence(rng, 1, 10) for _ in range(4)], rng.randrange(4))
                for i in range(n)]
    examples += [
        example(n, "She picks up the knife", [", and then cuts the onion.", ". The onion rolls away.",
                                              "'s handle is red.", "?!"], 0),  # leading punctuation
        example(n + 1, "The man sits down.", ["", "   ", "He smiles.", "x"], 2),  # empty after stripping
        example(n + 2, " ".join(rng.choices(WORDS, k=90)), ["He waves.", "They jump into the river again.",
                                                           "It is red.", "Then"], 1),  # > block_size
        example(n + 3, "Café naïve — déjà vu, he says", ["«bonjour»", "ok", "日本語", "🙂 fine."], 3),
        example(n + 4, "The page reads <|endoftext|> and then", ["<|endoftext|>", "it goes on.", "<|endoftext|> again",
                                                                "ok"], 2),  # plain text, not the special token
        example(n + 5, "Only the last word of this context fits", [x_tokens(BLOCK_SIZE - 1), "no", "yes", "maybe"], 1),
    ]
    return examples


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hf")
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=BLOCK_SIZE, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def examples():
    return make_examples()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, examples):
    return write_jsonl(tmp_path_factory.mktemp("data") / "fixture.jsonl", examples)


@pytest.fixture(scope="module")
def reference(hf_dir, examples):
    """(summed, mean) losses (N, 4) from HF, one unpadded row per ending."""
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    enc = tiktoken.get_encoding("gpt2")
    plain = functools.partial(enc.encode, allowed_special=set(), disallowed_special=())  # "<|endoftext|>" is text
    summed, mean = torch.zeros(len(examples), 4), torch.zeros(len(examples), 4)
    for n, ex in enumerate(examples):
        ctx = plain(ex["ctx"])
        endings = [plain(" " + e) for e in ex["endings"]]
        keep = BLOCK_SIZE - max(len(e) for e in endings)  # context + longest ending must fit
        ctx = ctx[len(ctx) - keep :] if len(ctx) > keep else ctx
        for j, end in enumerate(endings):
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([ctx + end])).logits[0].double(), dim=-1)
            token_losses = [-logp[len(ctx) - 1 + t, end[t]].item() for t in range(len(end))]
            summed[n, j] = sum(token_losses)
            mean[n, j] = sum(token_losses) / len(token_losses)
    return summed, mean


@pytest.fixture(scope="module")
def ours(hf_dir):
    return GPT.from_pretrained(hf_dir)


def test_fixture_exercises_the_edge_cases(examples):
    enc = tiktoken.get_encoding("gpt2")
    ctx_lengths = [len(enc.encode_ordinary(ex["ctx"])) for ex in examples]
    longest = [max(len(enc.encode_ordinary(" " + e)) for e in ex["endings"]) for ex in examples]
    assert max(ctx_lengths) > BLOCK_SIZE  # truncation happens
    assert BLOCK_SIZE - 1 in longest  # an ending that leaves room for exactly one context token
    assert 5 <= len(set(ctx_lengths)) < len(ctx_lengths)  # batches mix context lengths, and share some
    assert any(len(enc.encode_ordinary(" " + e)) == 1 for ex in examples for e in ex["endings"])  # one-token endings
    assert any("<|endoftext|>" in ex["ctx"] for ex in examples)  # text that looks like a special token


def test_endoftext_in_the_text_is_plain_text():
    enc = tiktoken.get_encoding("gpt2")
    ex = example(0, "He typed <|endoftext|> by mistake", ["<|endoftext|>", "and", "then", "<|endoftext|> again"], 0)
    ctx, endings, _ = encode_example(ex)
    assert enc.decode(ctx) == ex["ctx"] and enc.eot_token not in ctx  # the characters, not the special token
    for text, tokens in zip(ex["endings"], endings):
        assert enc.decode(tokens) == " " + text and enc.eot_token not in tokens


# ---------------------------------------------------------------- rendering


def test_render_example_is_context_then_each_ending():
    enc = tiktoken.get_encoding("gpt2")
    ex = example(0, "A man is sitting on a roof. He", ["starts pulling up roofing.", ", then", "", "is ok"], 3)
    tokens, mask, label = render_example(ex)
    ctx = enc.encode(ex["ctx"])
    assert label == 3 and tokens.shape == mask.shape
    for row, ending in enumerate(ex["endings"]):
        end = enc.encode(" " + ending)
        n = len(ctx) + len(end)
        assert tokens[row, :n].tolist() == ctx + end and not tokens[row, n:].any()
        assert mask[row].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * (tokens.size(1) - n)
    assert mask[2].sum() == 1  # the empty ending is the lone " " token, still scored


def test_render_truncates_the_context_from_the_left():
    enc = tiktoken.get_encoding("gpt2")
    ctx_text = " ".join(f"word{i}" for i in range(60))
    ex = example(0, ctx_text, ["one.", "two three four five.", "six", "seven eight"], 0)
    tokens, mask, _ = render_example(ex, block_size=20)
    endings = [enc.encode(" " + e) for e in ex["endings"]]
    keep = 20 - max(len(e) for e in endings)
    assert tokens.size(1) == 20
    for row, end in enumerate(endings):
        assert tokens[row, : keep + len(end)].tolist() == enc.encode(ctx_text)[-keep:] + end  # ending kept whole
    with pytest.raises(ValueError, match="no room for context"):
        encode_example(ex, block_size=5)  # the longest ending is 5 tokens


# ---------------------------------------------------------------- scoring


def test_batched_scores_match_hf_reference(ours, examples, reference):
    summed, mean = score_examples(ours, examples, "cpu", batch_size=8)
    torch.testing.assert_close(summed, reference[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mean, reference[1], rtol=1e-5, atol=1e-5)
    assert summed.argmin(1).tolist() == reference[0].argmin(1).tolist()
    assert mean.argmin(1).tolist() == reference[1].argmin(1).tolist()


def test_plain_loop_matches_hf_reference(ours, examples, reference):
    with hellaswag.inference(ours, "cpu"):
        rows = [score_naive(ours, ex, "cpu") for ex in examples]
    torch.testing.assert_close(torch.stack([s for s, _ in rows]), reference[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.stack([m for _, m in rows]), reference[1], rtol=1e-5, atol=1e-5)


def test_evaluate_counts_match_reference_and_restore_training_mode(ours, examples, reference):
    labels = torch.tensor([ex["label"] for ex in examples])
    correct = (reference[0].argmin(1) == labels).sum().item()
    correct_norm = (reference[1].argmin(1) == labels).sum().item()
    assert 0 < correct_norm < len(examples)  # not a degenerate all-or-nothing case
    ours.train()
    r = evaluate(ours, examples, "cpu", batch_size=5, return_predictions=True)
    assert ours.training
    assert (r["n"], r["correct"], r["correct_norm"]) == (len(examples), correct, correct_norm)
    assert r["acc"] == correct / len(examples) and r["acc_norm"] == correct_norm / len(examples)
    assert [p for _, p, _ in r["predictions"]] == reference[0].argmin(1).tolist()


def test_evaluate_stops_before_the_next_batch_when_asked(ours, examples, monkeypatch):
    """train_gpt2.py passes should_stop (a SIGTERM flag): one batch is scored after it turns true at most."""
    import hellaswag

    scored, real = [], hellaswag._score_batch
    monkeypatch.setattr(hellaswag, "_score_batch", lambda *a: scored.append(1) or real(*a))
    looks = []
    stop_after_two_batches = lambda: looks.append(1) or len(scored) >= 2  # noqa: E731
    assert evaluate(ours, examples, "cpu", batch_size=5, should_stop=stop_after_two_batches) is None
    assert len(scored) == 2 and len(looks) == 3  # looked before each batch; the third was never scored
    assert evaluate(ours, examples, "cpu", batch_size=5, should_stop=lambda: False)["n"] == len(examples)


def test_batch_size_does_not_change_any_example(ours, examples):
    one = score_examples(ours, examples, "cpu", batch_size=1)
    for batch_size in (3, 64):
        many = score_examples(ours, examples, "cpu", batch_size=batch_size)
        for a, b in zip(one, many):
            assert a.argmin(1).tolist() == b.argmin(1).tolist()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_padded_vocab_scores_like_trimmed(hf_dir, ours, examples):
    padded = GPT.from_pretrained(hf_dir, padded_vocab_size=50304)
    with torch.no_grad():  # make the padded rows loud: they would win every softmax if they leaked
        padded.lm_head.weight[50257:] = 100 * torch.randn(50304 - 50257, 32)
    for a, b in zip(score_examples(ours, examples, "cpu"), score_examples(padded, examples, "cpu")):
        assert a.argmin(1).tolist() == b.argmin(1).tolist()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def _distributed_worker(rank, world_size, init_file, model_dir, data_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = GPT.from_pretrained(model_dir)
        r = evaluate(model, load_examples(data_file=data_file), "cpu", batch_size=4, rank=rank,
                     world_size=world_size, return_predictions=True)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(r, f)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_agree_with_one(tmp_path, hf_dir, ours, data_file):
    single = evaluate(ours, load_examples(data_file=data_file), "cpu", batch_size=4, return_predictions=True)
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "rendezvous"), hf_dir, data_file, str(tmp_path)),
             nprocs=2, join=True)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    for r in ranks:  # every rank holds the summed counts
        assert (r["n"], r["correct"], r["correct_norm"]) == (single["n"], single["correct"], single["correct_norm"])
    merged = sorted(tuple(p) for r in ranks for p in r["predictions"])
    assert merged == sorted(single["predictions"])  # each example scored once, with the same predictions
    assert {p[0] for p in ranks[0]["predictions"]} == set(range(0, single["n"], 2))


# ---------------------------------------------------------------- data files and download


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    (json.dumps({"endings": ["a", "b", "c", "d"], "label": 0}), "missing field 'ctx'"),
    (json.dumps({"ctx": "x", "endings": ["a", "b", "c", "d"]}), "missing field 'label'"),
    (json.dumps({"ctx": "x", "endings": ["a", "b", "c"], "label": 0}), "list of 4 strings"),
    (json.dumps({"ctx": "x", "endings": ["a", "b", "c", 4], "label": 0}), "list of 4 strings"),
    (json.dumps({"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 4}), "integer 0-3"),
    (json.dumps({"ctx": "x", "endings": ["a", "b", "c", "d"], "label": "1"}), "integer 0-3"),
    (json.dumps({"ctx": "", "endings": ["a", "b", "c", "d"], "label": 1}), "non-empty string"),
])
def test_bad_lines_are_errors_naming_the_line(tmp_path, line, message):
    good = example(0, "A man", ["a", "b", "c", "d"], 0)
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", line])
    with pytest.raises(ValueError, match=f"bad.jsonl, line 3: .*{message}"):
        load_examples(data_file=path)


def test_a_file_that_is_not_utf8_names_its_line(tmp_path):
    good = json.dumps(example(0, "Café, déjà vu", ["a", "b", "c", "d"], 0), ensure_ascii=False)
    latin1 = json.dumps(example(1, "Café", ["a", "b", "c", "d"], 0), ensure_ascii=False).encode("latin-1")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good.encode("utf-8") + b"\n" + good.encode("utf-8") + b"\n" + latin1 + b"\n")
    offset = latin1.index(b"\xe9") + 1  # the "é" of "Café", one byte in Latin-1 (two in UTF-8)
    message = rf"latin1.jsonl, line 3: not UTF-8 text \(byte {offset} of the line is 0xe9\)"
    with pytest.raises(ValueError, match=message):
        load_examples(data_file=str(path))


def test_an_ending_longer_than_the_block_is_an_error_naming_its_line(tmp_path):
    fits = example(0, "A man", [x_tokens(BLOCK_SIZE - 1), "b", "c", "d"], 0)  # 47 tokens: 1 left for context
    too_long = example(1, "A man", ["a", "b", x_tokens(BLOCK_SIZE), "d"], 0)
    assert load_examples(data_file=write_jsonl(tmp_path / "fits.jsonl", [fits]), block_size=BLOCK_SIZE) == [fits]
    path = write_jsonl(tmp_path / "long.jsonl", [fits, "", too_long])
    assert load_examples(data_file=path) == [fits, too_long]  # no model, no limit
    with pytest.raises(ValueError, match="long.jsonl, line 3: ending 2 is 48 tokens long, .*block size of 48"):
        load_examples(data_file=path, block_size=BLOCK_SIZE)


def test_download_once_into_cache(tmp_path, monkeypatch):
    source = tmp_path / "source"
    source.mkdir()
    rows = make_examples(3)
    write_jsonl(source / "hellaswag_val.jsonl", rows)
    monkeypatch.setattr(hellaswag, "DATA_URL", f"file://{source}/hellaswag_{{split}}.jsonl")
    cache = tmp_path / "cache"
    assert load_examples("val", cache_dir=str(cache)) == rows
    assert os.listdir(cache) == ["hellaswag_val.jsonl"]  # no temporary file left behind
    os.remove(source / "hellaswag_val.jsonl")
    assert load_examples("val", cache_dir=str(cache)) == rows  # from the cache, not downloaded again


def test_unavailable_when_offline_or_not_allowed(tmp_path, monkeypatch):
    monkeypatch.setattr(hellaswag, "DATA_URL", f"file://{tmp_path}/nowhere/hellaswag_{{split}}.jsonl")
    with pytest.raises(HellaSwagUnavailable, match="could not download"):
        load_examples("val", cache_dir=str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []
    with pytest.raises(HellaSwagUnavailable, match="downloading is off"):
        load_examples("train", cache_dir=str(tmp_path / "cache"), download=False)


@pytest.fixture
def short_server():
    """A local HTTP server that promises 1,000 bytes and closes the connection after 100."""
    import http.server
    import threading

    class Short(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 100)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Short)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_truncated_download_is_not_cached(tmp_path, monkeypatch, short_server):
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # the local server, never through a proxy
    monkeypatch.setattr(hellaswag, "DATA_URL", short_server + "/hellaswag_{split}.jsonl")
    url = short_server + "/hellaswag_val.jsonl"
    message = f"could not download {url} (the connection closed after 100 of 1,000 bytes); with no internet, copy"
    with pytest.raises(HellaSwagUnavailable, match=re.escape(message)):
        load_examples("val", cache_dir=str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []  # neither the short file nor a .part file


def test_interrupted_download_leaves_no_part_file(tmp_path, monkeypatch):
    source = tmp_path / "hellaswag_val.jsonl"
    write_jsonl(source, make_examples(3))
    monkeypatch.setattr(hellaswag, "DATA_URL", f"file://{tmp_path}/hellaswag_{{split}}.jsonl")
    cache = tmp_path / "cache"
    seen = []

    class CtrlC:  # utils.download's progress bar is updated after each chunk: interrupt there
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            seen.extend(os.listdir(cache))  # the chunk is written: the temporary file exists now
            raise KeyboardInterrupt
    monkeypatch.setattr(utils, "tqdm", CtrlC)
    with pytest.raises(KeyboardInterrupt):
        load_examples("val", cache_dir=str(cache))
    assert len(seen) == 1 and seen[0].startswith(".hellaswag_val.jsonl.") and seen[0].endswith(".part")
    assert os.listdir(cache) == []  # and it is gone


def test_a_rank_without_examples_reports_nan_not_a_crash(ours, examples):
    r = evaluate(ours, examples[:3], "cpu", rank=4, world_size=5)  # no process group: only its own share
    assert r["n"] == 0 and r["correct"] == 0 and math.isnan(r["acc"]) and math.isnan(r["acc_norm"])


# ---------------------------------------------------------------- command line and batching


def test_cli_prints_accuracy(hf_dir, data_file, examples, reference, capsys):
    assert hellaswag.main(["-m", hf_dir, "--data-file", data_file, "--device", "cpu", "--limit", "20",
                           "--batch-size", "6"]) == 0
    out = capsys.readouterr().out
    labels = torch.tensor([ex["label"] for ex in examples[:20]])
    correct = (reference[0][:20].argmin(1) == labels).sum().item()
    correct_norm = (reference[1][:20].argmin(1) == labels).sum().item()
    assert f"acc        {correct / 20:.4f}  ({correct}/20)" in out
    assert f"acc_norm   {correct_norm / 20:.4f}  ({correct_norm}/20)" in out
    assert "examples   20" in out and "examples/s" in out


@pytest.mark.parametrize("native, flag, expected", [("1", [], torch.bfloat16), ("0", [], None),
                                                     ("1", ["--dtype", "float32"], None)])
def test_cli_dtype_auto_is_bf16_on_a_cpu_only_where_native(hf_dir, data_file, capsys, monkeypatch, native, flag,
                                                            expected):
    """bfloat16 scores 1.65x faster on a CPU with native bfloat16 (BENCHMARKS.md): auto takes it there
    only; an explicit --dtype wins. The scoring really runs under that autocast."""
    monkeypatch.setenv("GPT2_CPU_BF16", native)
    seen, real = [], hellaswag._score_batch

    def spy(*args):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real(*args)

    monkeypatch.setattr(hellaswag, "_score_batch", spy)
    assert hellaswag.main(["-m", hf_dir, "--data-file", data_file, "--device", "cpu", "--limit", "4", *flag]) == 0
    assert seen and set(seen) == {expected}


def test_cli_errors_are_messages_not_tracebacks(tmp_path, hf_dir, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"ctx": "x"}'])
    assert hellaswag.main(["-m", hf_dir, "--data-file", bad]) == 2
    assert "bad.jsonl, line 1: missing field 'endings'" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", make_examples(2))
    assert hellaswag.main(["-m", str(tmp_path / "no_such_model"), "--data-file", good]) == 2
    assert "no_such_model" in capsys.readouterr().err
    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hello")
    assert hellaswag.main(["-m", str(not_a_checkpoint), "--data-file", good, "--device", "cpu"]) == 2
    assert "notes.txt: not a train_gpt2.py checkpoint" in capsys.readouterr().err
    too_long = write_jsonl(tmp_path / "long.jsonl", [example(0, "A man", ["a", x_tokens(BLOCK_SIZE), "c", "d"], 0)])
    assert hellaswag.main(["-m", hf_dir, "--data-file", too_long, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "long.jsonl, line 1: ending 1 is 48 tokens long" in err
    assert hellaswag.main(["-m", hf_dir, "--data-file", good, "--device", "nonsense"]) == 2
    assert "--device nonsense: not usable on this machine" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert hellaswag.main(["-m", hf_dir, "--data-file", good, "--device", "cuda"]) == 2
        assert "--device cuda: not usable on this machine" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        hellaswag.main(["--limit", "0"])
    assert e.value.code == 2


def test_batches_cover_every_example_once_with_little_padding():
    rng = random.Random(0)
    encoded = [([1] * rng.choice([5, 5, 5, 6, 9, 20, 40]), [[1] * rng.randint(1, 4) for _ in range(4)], 0)
               for _ in range(200)]
    batches = hellaswag._batches(encoded, batch_size=16)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(200))
    packed = [len(encoded[i][0]) + sum(len(e) - 1 for e in encoded[i][1]) for i in flat]
    assert packed == sorted(packed)
    for b in batches:
        lengths = [len(encoded[i][0]) + sum(len(e) - 1 for e in encoded[i][1]) for i in b]
        assert len(b) <= 16 and len(b) * max(lengths) <= 1.25 * sum(lengths)
    assert sum(len(b) == 16 for b in batches) >= 200 // 16 - 4  # common lengths still fill whole batches
