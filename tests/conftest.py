"""Shared test setup: import the flat repo's modules, and use the offline tokenizer cache."""
import json
import os
import signal
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# CI and developers have ../shared beside the checkout; tiktoken then needs no network.
_cache = os.path.join(os.path.dirname(ROOT), "shared", "tiktoken_cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_cache):
    os.environ["TIKTOKEN_CACHE_DIR"] = _cache
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
# --dtype auto picks bfloat16 on CPUs that have it: tests compare against float32 references, so they
# run float32 unless they set this themselves (the tests of that choice do)
os.environ.setdefault("GPT2_CPU_BF16", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# A job started in the background by a script (`cmd &` with no job control, as CI runners and nohup
# do) has SIGINT ignored, and so has every process it starts: the tests that press Ctrl-C on a
# program they run would wait for it forever. Here Ctrl-C works as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Tiny Shakespeare, the text several tests build their data from: ../shared's copy (CI), or the
# input.txt that `python train_gpt2.py --preset shakespeare` downloads into the checkout.
_texts = [os.path.join(os.path.dirname(ROOT), "shared", "data", "input.txt"), os.path.join(ROOT, "input.txt")]
SHAKESPEARE = next((p for p in _texts if os.path.isfile(p)), None)
if SHAKESPEARE is None:
    pytest.exit("the tests need Tiny Shakespeare as input.txt in the repository (or ../shared/data/input.txt): "
                "run `python train_gpt2.py --preset shakespeare` once, which downloads it", returncode=4)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy shared CPU two spinning threads can make
    a step many times slower. Modules that train tiny models use this for all their tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_shards(directory, sizes, seed=0, doc_len=40):
    """edufineweb-style shards: shard 0 is val, the rest train. Every non-EOT token id is unique
    (0, 1, 2, ...), so a token seen twice or never is easy to spot. Documents start with
    EOT, except that train shard 2 starts mid-document, as a fineweb.py shard may."""
    from model import EOT

    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    next_id = 0
    for i, size in enumerate(sizes):
        tokens = np.arange(next_id, next_id + size, dtype=np.int64)
        starts = rng.choice(np.arange(1, size), size // doc_len, replace=False)
        tokens[starts] = EOT
        if i != 2:
            tokens[0] = EOT
        next_id += size
        assert next_id < EOT
        name = f"edufineweb_{'val' if i == 0 else 'train'}_{i:06d}.npy"
        np.save(os.path.join(directory, name), tokens.astype(np.uint16))
    return directory


HELLASWAG_EXAMPLES = [dict(ctx="The cat sat on the", endings=["mat.", "moon.", "idea.", "tax."], label=0),
                      dict(ctx="She poured the coffee into a", endings=["tree", "cup", "song", "wall"], label=1),
                      dict(ctx="To open the door he turned the", endings=["sky", "river", "handle", "year"], label=2),
                      dict(ctx="After the rain the streets were", endings=["loud", "blue", "tall", "wet"], label=3)]


def write_hellaswag(path, n=4):
    """The first n of four tiny examples in HellaSwag's schema, as a .jsonl file; a model trained on
    random tokens scores about chance on them."""
    with open(path, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in HELLASWAG_EXAMPLES[:n])
    return str(path)


def read_log(log_dir, name="log.jsonl"):
    """The records of a run's log.jsonl (or another file of --log-dir), in order."""
    with open(os.path.join(log_dir, name)) as f:
        return [json.loads(line) for line in f]


def train_losses(log_dir):
    """{step: train loss} of a run's log.jsonl."""
    return {r["step"]: r["train_loss"] for r in read_log(log_dir) if "train_loss" in r}
