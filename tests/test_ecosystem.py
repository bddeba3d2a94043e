"""train_gpt2.py with the tools around it: Weights & Biases logging (--wandb-project) and --eval-only.

wandb runs offline (WANDB_MODE=offline) into a directory of the test's own, and the test reads back
what wandb wrote there: the metrics and config must be log.jsonl's and the run's, and a resumed run
must continue the same wandb run. --eval-only's val loss is checked against Hugging Face's
GPT2LMHeadModel on the same tokens. Runs that use wandb or torchrun are subprocesses.
"""
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import logdir
import train_gpt2 as tg
from conftest import ROOT, read_log, write_hellaswag, write_shards

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "16", "--batch-size", "2",
        "--total-batch-size", "64", "--num-samples", "0", "--val-tokens", "64", "--seed", "7"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")), [400, 300, 250, 350])


def script(argv, wandb_dir=None, env=None, cmd=None):
    """train_gpt2.py as a subprocess (wandb offline into wandb_dir); returns (status, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if wandb_dir:
        env.update(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), WANDB_SILENT="true")
    cmd = cmd or [sys.executable, os.path.join(ROOT, "train_gpt2.py")]
    proc = subprocess.run([*cmd, *argv], env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


# ---------------------------------------------------------------- reading wandb's offline files


def wandb_records(path):
    """The records of an offline run's .wandb file. wandb 0.31 has no Python reader for it: the file is
    a ':W&B' header (7 bytes), then LevelDB's log format (32 KiB blocks of chunks, each with a 7-byte
    header: crc32, length, type 1 FULL / 2 FIRST / 3 MIDDLE / 4 LAST), each record one protobuf Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, chunks, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's last bytes, too few for a chunk header, are padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if length == 0 and kind == 0:  # zero padding up to the block's end
            pos += left - 7
            continue
        chunks += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def offline_run(wandb_dir):
    """The one offline run in wandb_dir: its id, config ({key: value}), history ({step: {key: value}},
    nested keys joined with '.') and files directory."""
    runs = [d for d in os.listdir(os.path.join(wandb_dir, "wandb")) if d.startswith("offline-run-")]
    assert len(runs) == 1, runs
    run_dir = os.path.join(wandb_dir, "wandb", runs[0])
    [name] = [n for n in os.listdir(run_dir) if n.endswith(".wandb")]
    key = lambda item: ".".join(item.nested_key) or item.key  # noqa: E731
    run_id, config, history = None, {}, {}
    for r in wandb_records(os.path.join(run_dir, name)):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
            config.update({key(i): json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            row = {key(i): json.loads(i.value_json) for i in r.history.item}
            assert row["_step"] not in history, f"step {row['_step']} logged twice"
            history[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    return run_id, config, history, os.path.join(run_dir, "files")


def assert_history_is_the_log(history, log):
    """Every value of every log.jsonl record is in wandb's row of its step, and wandb holds nothing else
    (but the samples)."""
    expected = {}
    for record in log:
        values = {k: v for k, v in record.items() if k != "step" and v is not None}  # mfu: None on a CPU
        expected.setdefault(record["step"], {}).update(values)
    got = {step: {k: v for k, v in row.items() if not k.startswith("samples.")} for step, row in history.items()}
    assert got == expected


# ---------------------------------------------------------------- Weights & Biases


def test_wandb_gets_every_log_record_the_config_and_the_samples(shards, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    log_dir = tmp_path / "run"
    argv = [*TINY, "--data", shards, "--max-steps", "4", "--eval-every", "2", "--sample-every", "2",
            "--num-samples", "2", "--sample-tokens", "4", "--hellaswag-file", write_hellaswag(tmp_path / "hs.jsonl"),
            "--log-dir", str(log_dir), "--wandb-project", "gpt2-tests", "--wandb-run-name", "tiny"]
    code, out, err = script(argv, wandb_dir=tmp_path)
    assert code == 0, out + err
    run_id, config, history, files = offline_run(tmp_path)

    log = read_log(log_dir)
    assert {"train_loss", "lr", "norm", "tok_per_s", "val_loss", "hellaswag"} <= {k for r in log for k in r}
    assert_history_is_the_log(history, log)
    assert sorted(history) == [0, 1, 2, 3, 4]

    assert config["batch_size"] == 2 and config["seq_len"] == 16 and config["n_layer"] == 2
    assert config["data"] == shards and config["wandb_run_name"] == "tiny" and config["max_steps"] == 4
    assert config["model_config"] == dict(block_size=16, vocab_size=50257, n_layer=2, n_head=2, n_embd=32,
                                          padded_vocab_size=50304)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50304, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    assert config["num_params"] == sum(p.numel() for p in hf.parameters())  # lm_head is wte: counted once
    assert config["world_size"] == 1 and config["torch_version"] == torch.__version__

    # the samples: a table per sample step (2 and 4), holding the texts printed on stdout
    printed = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("rank 0 sample ")]
    assert len(printed) == 4
    tables = []
    for step in (2, 4):
        with open(os.path.join(files, history[step]["samples.path"])) as f:
            table = json.load(f)
        assert table["columns"] == ["sample"]
        tables += [row[0] for row in table["data"]]
    assert tables == printed
    assert all(text.startswith("Hello, I'm a language model,") for text in tables)


def sigterm_at_pause(argv, tmp_path, pause_at, nth):
    """train_gpt2.py argv as a subprocess (wandb offline into tmp_path/first), let through the first
    nth - 1 times it reaches pause point pause_at, and SIGTERM it at the nth: a signal at an exact
    moment. Returns what it printed; it must exit 0 (it checkpoints and stops)."""
    pause_file = tmp_path / "pause"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "first"),
           "WANDB_SILENT": "true", "GPT2_PAUSE_AT": pause_at, "GPT2_PAUSE_FILE": str(pause_file)}
    os.makedirs(tmp_path / "first")
    with open(tmp_path / "first.out", "w") as out:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_gpt2.py"), *argv], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        for pause in range(1, nth + 1):
            deadline = time.monotonic() + 300
            while not pause_file.exists():  # polling for the pause file, with a generous timeout
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "first.out").read_text()
                time.sleep(0.02)
            if pause == nth:
                proc.send_signal(signal.SIGTERM)
            pause_file.unlink()
        assert proc.wait(timeout=300) == 0, (tmp_path / "first.out").read_text()
    finally:
        proc.kill()
    return (tmp_path / "first.out").read_text()


def test_a_resumed_run_continues_the_same_wandb_run_and_a_cut_short_step_is_logged_once(shards, tmp_path):
    """A SIGTERM in step 2's evals (after its val loss was logged, before HellaSwag) stops the run with
    a checkpoint at step 2; the resumed run redoes step 2's evals. wandb gets step 2 once, from the
    resumed run, which continues the first one's wandb run (its id is in the checkpoints)."""
    log_dir = tmp_path / "run"
    common = [*TINY, "--data", shards, "--max-steps", "4", "--eval-every", "2", "--checkpoint-every", "0",
              "--hellaswag-file", write_hellaswag(tmp_path / "hs.jsonl"), "--log-dir", str(log_dir),
              "--wandb-project", "gpt2-tests"]
    # step 0's HellaSwag goes on; the run stands before step 2's
    first = sigterm_at_pause(common, tmp_path, "hellaswag", nth=2)
    assert "stopped by a signal during the evals at step 2" in first, first
    assert [r["step"] for r in read_log(log_dir) if "val_loss" in r] == [0, 2]  # logged, then cut short

    code, out, err = script([*common, "--resume", "auto"], wandb_dir=tmp_path / "second")
    assert code == 0, out + err
    id1, _, history1, _ = offline_run(tmp_path / "first")
    id2, config2, history2, _ = offline_run(tmp_path / "second")
    assert id1 == id2
    for step in (2, 4):
        assert torch.load(log_dir / f"ckpt_{step:06d}.pt", weights_only=True)["wandb_id"] == id1
    assert sorted(history1) == [0, 1] and sorted(history2) == [2, 3, 4]  # step 2 once, and whole
    assert_history_is_the_log({**history1, **history2}, read_log(log_dir))
    assert config2["resume"] == "auto"


def test_steps_a_resumed_wandb_run_already_holds_are_not_sent_again(monkeypatch):
    """Online, a resumed wandb run starts after the last step it holds (run.starting_step), and refuses
    lower steps one by one. After a crash, the steps between the checkpoint and the crash come again:
    they are skipped, and the run's rows continue from where wandb stands."""
    sent = []

    class Run:  # what start_wandb keeps of wandb.init's run
        id, starting_step = "abc", 3

        def log(self, row, step, commit):
            sent.append((step, row, commit))

    monkeypatch.setitem(logdir.WANDB, "run", Run())
    monkeypatch.setitem(logdir.WANDB, "row", {})
    monkeypatch.setitem(logdir.WANDB, "first_step", Run.starting_step)
    for step in range(1, 5):  # resumed from a checkpoint at step 1
        logdir.log(None, step, val_loss=10.0 + step, mfu=None)
        logdir.log(None, step, train_loss=float(step))
    logdir.send_wandb_row()
    assert sent == [(3, {"val_loss": 13.0, "train_loss": 3.0}, True), (4, {"val_loss": 14.0, "train_loss": 4.0}, True)]


def test_wandb_project_without_wandb_installed_is_a_clear_error_before_anything_is_done(shards, tmp_path):
    hide_wandb = ("import runpy, sys; sys.modules['wandb'] = None; "  # `import wandb` now raises ImportError
                  "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    code, out, err = script([os.path.join(ROOT, "train_gpt2.py"), *TINY, "--data", shards, "--log-dir",
                             str(tmp_path / "run"), "--wandb-project", "p"], cmd=[sys.executable, "-c", hide_wandb])
    assert code == 2
    assert "error: --wandb-project needs the wandb package: pip install wandb" in err
    assert not (tmp_path / "run").exists()


def test_flag_combinations_that_make_no_sense_are_usage_errors(capsys):
    for argv, message in (
            (["--eval-only"], "--eval-only needs --init-from MODEL"),
            (["--eval-only", "--init-from", "gpt2", "--resume", "auto"], "--eval-only trains nothing, so there is "
                                                                           "nothing to --resume"),
            (["--wandb-run-name", "x"], "--wandb-run-name names a run of --wandb-project: pass --wandb-project too")):
        with pytest.raises(SystemExit) as exit_:
            tg.parse_args(argv)
        assert exit_.value.code == 2
        assert f"error: {message}" in capsys.readouterr().err


# ---------------------------------------------------------------- --eval-only


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny random GPT-2 in Hugging Face's format (save_pretrained)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257))
    directory = str(tmp_path_factory.mktemp("hf_model"))
    model.save_pretrained(directory)
    return directory


EVAL = ["--batch-size", "2", "--seq-len", "32", "--val-tokens", "256", "--no-hellaswag"]  # 4 batches of 2 x 32


def hf_val_loss(model_dir, val_shard, batches, B, T):
    """HF's mean cross-entropy, float32, over the first batches x B x T targets of the val shard, in the
    B x T windows of training's evals: every token after the first is a target once."""
    from transformers import GPT2LMHeadModel

    tokens = torch.from_numpy(np.load(val_shard).astype(np.int64))[:batches * B * T + 1]
    x, y = tokens[:-1].view(batches * B, T), tokens[1:].view(batches * B, T)
    model = GPT2LMHeadModel.from_pretrained(model_dir).float().eval()
    with torch.no_grad():
        logits = model(x).logits
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item()


def test_eval_only_val_loss_equals_hugging_faces_and_adds_one_record_touching_nothing_else(shards, hf_model,
                                                                                         tmp_path, capsys):
    log_dir = tmp_path / "run"
    log_dir.mkdir()
    earlier = '{"step": 7, "train_loss": 3.5}\n'  # an earlier run's log and checkpoint: kept as they are
    (log_dir / "log.jsonl").write_text(earlier)
    (log_dir / "ckpt_000007.pt").write_bytes(b"not touched")
    assert tg.main(["--eval-only", "--init-from", hf_model, "--data", shards, *EVAL, "--log-dir", str(log_dir)]) == 0
    out = capsys.readouterr().out
    expected = hf_val_loss(hf_model, os.path.join(shards, "edufineweb_val_000000.npy"), 4, 2, 32)
    printed = float(re.search(r"^val loss (\S+)$", out, re.M).group(1))
    assert printed == pytest.approx(expected, abs=1e-5)
    assert (log_dir / "log.jsonl").read_text().startswith(earlier)
    record = read_log(log_dir)[1:]
    assert record == [{"step": 0, "val_loss": pytest.approx(expected, abs=1e-5), "eval_only": True, "model": hf_model}]
    assert sorted(os.listdir(log_dir)) == ["ckpt_000007.pt", "log.jsonl"]  # no checkpoint, no lock left
    assert (log_dir / "ckpt_000007.pt").read_bytes() == b"not touched"


def test_eval_only_under_torchrun_gives_the_same_numbers(shards, hf_model, tmp_path):
    hellaswag = ["--hellaswag", "--hellaswag-file", write_hellaswag(tmp_path / "hs.jsonl")]
    argv = ["--eval-only", "--init-from", hf_model, "--data", shards, *EVAL, *hellaswag]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                os.path.join(ROOT, "train_gpt2.py")]
    code, out, err = script([*argv, "--log-dir", str(tmp_path / "two")], cmd=torchrun)
    assert code == 0, out + err
    assert "val loss on 256 tokens" in out
    assert tg.main([*argv, "--log-dir", str(tmp_path / "one")]) == 0
    [two], [one] = read_log(tmp_path / "two"), read_log(tmp_path / "one")
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
    assert two["hellaswag"] == one["hellaswag"]
    assert "/4)" in out.split("hellaswag acc_norm")[1]  # all 4 examples, 2 scored by each rank


def test_eval_only_of_a_training_checkpoint_logs_its_step_and_trainings_val_loss(shards, tmp_path):
    run = tmp_path / "run"
    assert tg.main([*TINY, "--no-hellaswag", "--data", shards, "--max-steps", "3", "--eval-every", "0",
                    "--log-dir", str(run)]) == 0
    trained = [r["val_loss"] for r in read_log(run) if "val_loss" in r and r["step"] == 3]
    argv = ["--eval-only", "--init-from", str(run / "ckpt_000003.pt"), "--data", shards, "--batch-size", "2",
            "--seq-len", "16", "--val-tokens", "64", "--no-hellaswag", "--log-dir", str(tmp_path / "eval")]
    assert tg.main(argv) == 0  # the same tokens as training's evals: the same val loss
    [record] = read_log(tmp_path / "eval")
    assert record["step"] == 3 and record["val_loss"] == pytest.approx(trained[0], rel=1e-6)


def test_eval_only_needs_only_the_val_shard(shards, hf_model, tmp_path):
    """`python fineweb.py --max-shards 1` writes the val shard alone: enough to evaluate, not to train."""
    val_only = tmp_path / "val_only"
    val_only.mkdir()
    os.link(os.path.join(shards, "edufineweb_val_000000.npy"), val_only / "edufineweb_val_000000.npy")
    argv = ["--init-from", hf_model, "--data", str(val_only), *EVAL]
    assert tg.main(["--eval-only", *argv, "--log-dir", str(tmp_path / "eval")]) == 0
    expected = hf_val_loss(hf_model, str(val_only / "edufineweb_val_000000.npy"), 4, 2, 32)
    assert read_log(tmp_path / "eval")[0]["val_loss"] == pytest.approx(expected, abs=1e-5)
    assert tg.main([*argv, "--max-steps", "1", "--log-dir", str(tmp_path / "train")]) == 2  # training needs train shards


def test_a_signal_before_a_step_logs_anything_keeps_the_previous_steps_wandb_row(shards, tmp_path):
    """A SIGTERM in step 2's first val batch, before step 2 logged anything: the row not yet sent is
    step 1's, which the resumed run (from step 2) does not redo. It must reach wandb; nothing of step
    2 does, until the resumed run sends it."""
    log_dir = tmp_path / "run"
    common = [*TINY, "--no-hellaswag", "--data", shards, "--max-steps", "4", "--eval-every", "2",
              "--checkpoint-every", "0", "--log-dir", str(log_dir), "--wandb-project", "gpt2-tests"]
    # step 0's 2 val batches (64 tokens / 2 x 16) go on; the 3rd is step 2's first
    assert "stopped by a signal during the evals at step 2" in sigterm_at_pause(common, tmp_path, "val_batch", nth=3)
    code, out, err = script([*common, "--resume", "auto"], wandb_dir=tmp_path / "second")
    assert code == 0, out + err
    _, _, history1, _ = offline_run(tmp_path / "first")
    _, _, history2, _ = offline_run(tmp_path / "second")
    assert sorted(history1) == [0, 1] and sorted(history2) == [2, 3, 4]
    assert_history_is_the_log({**history1, **history2}, read_log(log_dir))
