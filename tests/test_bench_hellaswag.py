"""bench_hellaswag.py: the plain loop and the batched scoring agree on fake examples built from
Tiny Shakespeare (both are checked against Hugging Face in test_hellaswag.py), and the command
line reports speed, agreement, and bad input as `error: ...`."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import bench_hellaswag
import model
from bench_hellaswag import benchmark, fake_examples
from conftest import SHAKESPEARE
from hellaswag import check_example
from model import GPT

BLOCK_SIZE = 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hf")
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=BLOCK_SIZE, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(d)
    return str(d)


def test_fake_examples_are_valid_hellaswag_examples():
    fake = fake_examples(SHAKESPEARE, 20)
    with open(SHAKESPEARE) as f:
        text = " ".join(f.read().split())  # the examples' text has its line breaks turned into spaces
    assert len(fake) == 20
    for i, ex in enumerate(fake):
        check_example(ex, f"fake example {i}", BLOCK_SIZE)
        assert all(ending in text for ending in ex["endings"])  # sentences of the text
    assert len({ex["label"] for ex in fake}) > 1  # the right ending is not always in the same place


def test_benchmark_agrees_with_plain_loop(hf_dir):
    r = benchmark(GPT.from_pretrained(hf_dir), fake_examples(SHAKESPEARE, 12), "cpu", batch_size=4)
    assert r["n"] == 12 and r["agreement"] == 1.0 and r["max_rel_diff"] < 1e-5
    assert r["naive_per_s"] > 0 and r["fast_per_s"] > 0


def test_cli_prints_speed_and_agreement(hf_dir, capsys):
    assert bench_hellaswag.main(["-m", hf_dir, "--fake-from", SHAKESPEARE, "--device", "cpu", "--limit", "6",
                                 "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    assert f"6 examples, {hf_dir}, cpu, float32" in out
    for line in ("plain loop ", "batched ", "(batch size 3)", "speedup ", "identical predictions: yes (100.00% agree)"):
        assert line in out


def test_cli_random_init_builds_the_named_size(monkeypatch, capsys):
    sizes = []

    def small(name, **overrides):  # the -m size's config, shrunk so that the test stays fast
        sizes.append(name)
        return config_for(name, n_layer=1, n_head=2, n_embd=32, block_size=BLOCK_SIZE, **overrides)
    config_for = model.config_for
    monkeypatch.setattr(model, "config_for", small)
    assert bench_hellaswag.main(["-m", "gpt2-medium", "--random-init", "--fake-from", SHAKESPEARE,
                                 "--device", "cpu", "--limit", "2"]) == 0
    assert sizes == ["gpt2-medium"] and "2 examples, gpt2-medium (random weights), cpu" in capsys.readouterr().out


def test_cli_exits_1_when_float32_predictions_differ(hf_dir, monkeypatch, capsys):
    batched = bench_hellaswag._score_batch

    def wrong(model, batch, device):  # negated losses: the batched side now picks the least likely ending
        summed, mean = batched(model, batch, device)
        return -summed, -mean
    monkeypatch.setattr(bench_hellaswag, "_score_batch", wrong)
    argv = ["-m", hf_dir, "--fake-from", SHAKESPEARE, "--device", "cpu", "--limit", "4"]
    assert bench_hellaswag.main(argv) == 1
    assert "identical predictions: NO (0.00% agree)" in capsys.readouterr().out
    assert bench_hellaswag.main(argv + ["--dtype", "bfloat16"]) == 0  # 16-bit: a flipped near-tie is allowed
    assert "identical predictions: NO" in capsys.readouterr().out


def test_cli_errors_are_messages_not_tracebacks(tmp_path, hf_dir, capsys):
    few = tmp_path / "few.txt"
    few.write_text("One sentence here. And a second one.")
    cases = [
        (["--fake-from", str(few)], "few.txt: too few sentences"),
        (["--fake-from", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--data-file", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--fake-from", SHAKESPEARE, "--device", "nonsense"], "--device nonsense: not usable on this machine"),
        (["--fake-from", SHAKESPEARE, "-m", "gpt3", "--random-init"], "-m gpt3: unknown model size"),
    ]
    for argv, message in cases:
        assert bench_hellaswag.main(["-m", hf_dir, "--device", "cpu", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)


def test_fake_sentences_longer_than_the_block_are_an_error(tmp_path, capsys):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=8, vocab_size=50257)).save_pretrained(
        tmp_path / "short")
    capsys.readouterr()  # save_pretrained's progress bar
    assert bench_hellaswag.main(["-m", str(tmp_path / "short"), "--fake-from", SHAKESPEARE, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {SHAKESPEARE}, fake example ") and "no room for context" in err
    assert "block size of 8" in err
