"""train_gpt2.py on the CPU: schedule, data order, world-size invariance, exact resume, signals, errors.

Tiny models (2 layers, width 32, 16-token sequences) on shards the tests write themselves; runs go
through main(argv) in-process, or as subprocesses where torchrun or a real signal is the point.
"""
import contextlib
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train_gpt2 as tg
import dataloader
from conftest import ROOT, SHAKESPEARE, read_log, train_losses, write_hellaswag, write_shards
from model import GPT, GPTConfig

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "16", "--batch-size", "2",
        "--total-batch-size", "64", "--no-hellaswag", "--num-samples", "0", "--eval-every", "0",
        "--val-tokens", "64", "--seed", "7"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")), [400, 300, 250, 350])


def complete_lines(path):
    """Lines of a file another process is appending to (a last line may still be half-written)."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(line.endswith("\n") for line in f)


@contextlib.contextmanager
def running_until_logged(cmd, log_dir, records=3):
    """Start cmd (a training run writing to log_dir) and wait for `records` complete log lines;
    on leaving, make sure no process of it is left behind, whatever happened."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        deadline = time.time() + 120
        while complete_lines(log_dir / "log.jsonl") < records:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def run(args, capsys=None):
    code = tg.main(args)
    return code if capsys is None else (code, *capsys.readouterr())


# ---------------------------------------------------------------- schedule and optimizer


def test_defaults_and_lr_schedule():
    args = tg.parse_args([])
    assert (args.total_batch_size, args.batch_size, args.seq_len) == (524288, 64, 1024)
    assert (args.lr, args.min_lr_ratio, args.warmup_steps, args.max_steps) == (6e-4, 0.1, 715, 19073)
    assert (args.weight_decay, args.grad_clip, args.padded_vocab_size) == (0.1, 1.0, 50304)
    assert tg.get_lr(0, args) == pytest.approx(6e-4 / 715, rel=1e-12)  # warmup: (step + 1) / 715
    assert tg.get_lr(714, args) == pytest.approx(6e-4, rel=1e-12)  # end of warmup: the peak
    assert tg.get_lr(715, args) == pytest.approx(6e-4, rel=1e-12)  # cosine starts at the peak
    assert tg.get_lr(9894, args) == pytest.approx(3.3e-4, rel=1e-12)  # halfway: (6e-4 + 6e-5) / 2
    assert tg.get_lr(19073, args) == pytest.approx(6e-5, rel=1e-12)  # the end: 10% of the peak
    assert tg.get_lr(30000, args) == pytest.approx(6e-5, rel=1e-12)  # and it stays there


def test_preset_defaults_and_explicit_flags_win():
    args = tg.parse_args(["--preset", "shakespeare", "--max-steps", "7"])
    assert args.data == "input.txt" and args.n_layer == 6 and args.max_steps == 7 and not args.hellaswag


def test_the_shakespeare_preset_is_the_measured_one():
    # the settings BENCHMARKS.md measured (val loss 5.4 in under 3 minutes on 2 cores): small steps,
    # one micro-batch each, 1.7 epochs of the 304,222 training tokens
    args = tg.parse_args(["--preset", "shakespeare"])
    assert (args.n_layer, args.n_head, args.n_embd, args.seq_len) == (6, 4, 128, 128)
    assert tg.check_batch_layout(args, world_size=1) == 1 and args.batch_size * args.seq_len == 1024
    assert (args.max_steps, args.warmup_steps, args.lr, args.min_lr_ratio) == (500, 20, 3e-3, 0.1)
    assert 1.65 < args.max_steps * args.total_batch_size / 304_222 < 1.7  # epochs
    assert args.dtype == "auto" and args.compile is None  # bfloat16 where the CPU has it; no compile on a CPU
    assert args.eval_every == 125 and args.print_every == 25 and args.checkpoint_every == 0
    assert (args.num_samples, args.sample_tokens, args.sample_prompt) == (1, 160, "ROMEO:")


def test_weight_decay_groups_of_the_trained_optimizer(shards, tmp_path):
    assert run([*TINY, "--data", shards, "--max-steps", "1", "--log-dir", str(tmp_path)]) == 0
    ckpt = torch.load(tmp_path / "ckpt_000001.pt", weights_only=True)
    model = GPT(GPTConfig(**ckpt["config"]))
    decay, no_decay = ckpt["optimizer"]["param_groups"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    shape = {i: tuple(s["exp_avg"].shape) for i, s in ckpt["optimizer"]["state"].items()}
    named = dict(model.named_parameters())  # the tied wte / lm_head tensor appears once
    matrices = [n for n in named if n.endswith(".weight") and "ln_" not in n]  # embeddings and matmuls
    assert len(matrices) == 2 + 4 * 2 and "transformer.wte.weight" in matrices
    assert sorted(shape[i] for i in decay["params"]) == sorted(tuple(named[n].shape) for n in matrices)
    others = [n for n in named if n not in matrices]  # biases and LayerNorm weights: no decay
    assert sorted(shape[i] for i in no_decay["params"]) == sorted(tuple(named[n].shape) for n in others)


# ---------------------------------------------------------------- training runs


def test_log_records_and_checkpoint_contents(shards, tmp_path):
    args = [*TINY, "--data", shards, "--max-steps", "6", "--warmup-steps", "2", "--eval-every", "3",
            "--checkpoint-every", "2", "--keep-checkpoints", "2", "--log-dir", str(tmp_path)]
    assert run(args) == 0
    records = read_log(tmp_path)
    steps = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in steps] == list(range(6))
    assert set(steps[0]) == {"step", "train_loss", "lr", "norm", "dt_ms", "tok_per_s", "mfu"}
    parsed = tg.parse_args(args)
    for r in steps:
        assert r["lr"] == pytest.approx(tg.get_lr(r["step"], parsed)) and r["mfu"] is None
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 6]
    assert sorted(os.listdir(tmp_path)) == ["ckpt_000004.pt", "ckpt_000006.pt", "log.jsonl"]  # newest 2
    ckpt = torch.load(tmp_path / "ckpt_000006.pt", weights_only=True)
    assert set(ckpt) == {"model", "config", "optimizer", "step", "loader", "rng", "args"}
    assert ckpt["step"] == 6 and ckpt["config"]["n_layer"] == 2 and ckpt["args"]["max_steps"] == 6
    assert GPT.from_pretrained(str(tmp_path / "ckpt_000006.pt")).config.n_embd == 32
    # --init-from a checkpoint starts from its weights: the first val loss is the last one of that run
    finetune = tmp_path / "finetune"
    assert run([*TINY, "--data", shards, "--max-steps", "1", "--init-from", str(tmp_path / "ckpt_000006.pt"),
                "--eval-every", "1", "--log-dir", str(finetune)]) == 0
    first = read_log(finetune)[0]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(records[-1]["val_loss"], rel=1e-6)


def test_resume_reproduces_the_uninterrupted_run(shards, tmp_path, monkeypatch):
    common = [*TINY, "--data", shards, "--max-steps", "9", "--warmup-steps", "3", "--eval-every", "4"]
    assert run([*common, "--log-dir", str(tmp_path / "a")]) == 0
    real_step, calls = tg.train_step, []

    def step_then_signal(*a, **k):  # a SIGTERM arrives during the 4th step: the run stops after it
        calls.append(1)
        out = real_step(*a, **k)
        if len(calls) == 4:  # a preemption often arrives twice (the scheduler's and torchrun's)
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(tg, "train_step", step_then_signal)
    assert run([*common, "--log-dir", str(tmp_path / "b")]) == 0
    monkeypatch.setattr(tg, "train_step", real_step)
    assert sorted(p.name for p in (tmp_path / "b").glob("*.pt")) == ["ckpt_000004.pt"]
    assert max(train_losses(tmp_path / "b")) == 3
    (tmp_path / "b" / "ckpt_000006.pt.tmp").write_bytes(b"half a checkpoint")  # a save killed mid-write
    assert run([*common, "--log-dir", str(tmp_path / "b"), "--resume", "auto"]) == 0
    assert not list((tmp_path / "b").glob("*.tmp"))  # removed at start
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b]  # every step logged once, in order
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss", "norm", "lr"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-6)
    final_a = torch.load(tmp_path / "a" / "ckpt_000009.pt", weights_only=True)["model"]
    final_b = torch.load(tmp_path / "b" / "ckpt_000009.pt", weights_only=True)["model"]
    for k in final_a:
        torch.testing.assert_close(final_b[k], final_a[k], rtol=1e-6, atol=1e-6)


def test_sigterm_mid_run_leaves_a_checkpoint_the_resumed_run_continues_exactly(shards, tmp_path):
    # a constant learning rate, so that the schedule does not depend on --max-steps
    common = [*TINY, "--data", shards, "--warmup-steps", "0", "--min-lr-ratio", "1"]
    log_dir = tmp_path / "sig"
    cmd = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), *common, "--max-steps", "100000",
           "--log-dir", str(log_dir)]
    with running_until_logged(cmd, log_dir) as proc:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopped by a signal" in out
    (ckpt_path,) = log_dir.glob("ckpt_*.pt")
    ckpt = torch.load(ckpt_path, weights_only=True)
    k = ckpt["step"]
    assert ckpt_path.name == f"ckpt_{k:06d}.pt" and sorted(train_losses(log_dir)) == list(range(k))
    assert run([*common, "--max-steps", str(k + 3), "--log-dir", str(log_dir), "--resume", str(ckpt_path)]) == 0
    assert run([*common, "--max-steps", str(k + 3), "--log-dir", str(tmp_path / "ref")]) == 0
    resumed, reference = train_losses(log_dir), train_losses(tmp_path / "ref")
    assert sorted(resumed) == list(range(k + 3))
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6, abs=1e-6)


def test_two_gloo_ranks_match_one_process_with_twice_the_accumulation(shards, tmp_path):
    # 2 ranks x 2 micro-steps (the first under no_sync) against 1 process x 4 micro-steps
    common = [*TINY, "--data", shards, "--max-steps", "6", "--warmup-steps", "2", "--total-batch-size", "128"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train_gpt2.py"), *common, "--log-dir", str(tmp_path / "ddp")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "x 2 rank(s) x 2 accumulation step(s)" in proc.stdout
    assert run([*common, "--log-dir", str(tmp_path / "one")]) == 0
    ddp, one = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "one")
    assert sorted(ddp) == sorted(one) == list(range(6))
    for step in one:
        assert ddp[step] == pytest.approx(one[step], rel=1e-5)
    p_ddp = torch.load(tmp_path / "ddp" / "ckpt_000006.pt", weights_only=True)["model"]
    p_one = torch.load(tmp_path / "one" / "ckpt_000006.pt", weights_only=True)["model"]
    for k in p_one:
        a, b = p_ddp[k], p_one[k]
        if k.endswith("attn.c_attn.bias"):
            # The key bias gets an exactly-zero gradient (it shifts all of a query's scores by the same
            # q.b, which softmax ignores), so it holds only rounding noise, that Adam's division by
            # sqrt(v) blows up to ~lr-sized steps: there both runs must stay at noise level.
            C = len(b) // 3
            assert a[C:2 * C].abs().max() < 1e-5 and b[C:2 * C].abs().max() < 1e-5
            a, b = torch.cat([a[:C], a[2 * C:]]), torch.cat([b[:C], b[2 * C:]])  # queries and values
        assert torch.linalg.norm(a - b) <= 1e-5 * torch.linalg.norm(b), k


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(shards, tmp_path):
    # preemption may reach one worker only: SIGTERM rank 1, and rank 0 (which writes checkpoints) must stop too
    log_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_gpt2.py"), *TINY, "--data", shards, "--max-steps", "100000",
           "--log-dir", str(log_dir)]
    with running_until_logged(cmd, log_dir) as proc:
        rank1 = [pid for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
                 .stdout.split() if b"RANK=1" in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")]
        assert len(rank1) == 1
        os.kill(int(rank1[0]), signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    (ckpt_path,) = log_dir.glob("ckpt_*.pt")
    k = torch.load(ckpt_path, weights_only=True)["step"]
    assert f"stopped by a signal after step {k - 1};" in out and sorted(train_losses(log_dir)) == list(range(k))


def test_non_finite_loss_stops_without_overwriting_the_last_checkpoint(shards, tmp_path, capsys):
    args = [*TINY, "--data", shards, "--max-steps", "10", "--warmup-steps", "0", "--lr", "1e30",
            "--checkpoint-every", "1", "--log-dir", str(tmp_path)]
    code, _, err = run(args, capsys)
    assert code == 1
    bad_step = max(train_losses(tmp_path)) + 1  # the first step that was not logged
    assert f"error: step {bad_step}:" in err and ("nan" in err or "inf" in err)
    assert bad_step >= 1  # step 0 is fine; its update (lr 1e30) breaks the next one
    # a checkpoint after every good step, the newest 3 kept; none for the bad step
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [f"ckpt_{s:06d}.pt" for s in range(1, bad_step + 1)][-3:]
    assert all(math.isfinite(v) for v in train_losses(tmp_path).values())


def test_shakespeare_preset_end_to_end(tmp_path, monkeypatch, capsys):
    # a first run, as a new user types it: input.txt is not there, so it is downloaded (here from a
    # file:// URL: the same code path, offline), then a small model trains on it (fewer steps here)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dataloader, "SHAKESPEARE_URL", pathlib.Path(SHAKESPEARE).as_uri())
    code, out, _ = run(["--preset", "shakespeare", "--max-steps", "8", "--eval-every", "8", "--val-tokens", "2048",
                        "--print-every", "5"], capsys)
    assert code == 0
    assert "input.txt not found: downloading" in out and (tmp_path / "input.txt").read_bytes() == \
        pathlib.Path(SHAKESPEARE).read_bytes()
    val = [r["val_loss"] for r in read_log(tmp_path / "log" / "shakespeare") if "val_loss" in r]
    assert len(val) == 2 and val[0] > 10 and val[-1] < val[0] - 0.3  # from ~ln(50257) = 10.8, falling
    assert "rank 0 sample 0: ROMEO:" in out
    assert "304,222 tokens" in out  # 90% of Tiny Shakespeare's 338,025 GPT-2 tokens
    # what a newcomer reads: a step line every --print-every steps and at the last, where the log is,
    # and at the end how to sample from what was trained
    assert [int(line.split()[1].split("/")[0]) for line in out.splitlines() if "/8 | loss" in line] == [0, 5, 7]
    assert "log: log/shakespeare/log.jsonl" in out
    assert "done at step 8 after " in out and "python sample.py -m log/shakespeare/ckpt_000008.pt --prompt=ROMEO:" in out
    assert len(train_losses(tmp_path / "log" / "shakespeare")) == 8  # log.jsonl still has every step


def test_shakespeare_offline_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dataloader, "SHAKESPEARE_URL", (tmp_path / "unreachable.txt").as_uri())
    expect_error(["--preset", "shakespeare"], capsys, "--data input.txt does not exist", "downloading it failed",
                 "by hand")
    assert os.listdir(tmp_path) == []  # nothing half-written


# ---------------------------------------------------------------- bad input


def expect_error(args, capsys, *fragments):
    code, _, err = run(args, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_missing_data_directory(tmp_path, capsys):
    expect_error([*TINY, "--data", str(tmp_path / "nope"), "--log-dir", str(tmp_path)], capsys,
                 str(tmp_path / "nope"), "python fineweb.py")


@pytest.mark.parametrize("problem", ["dtype", "empty", "unreadable", "2-D", "token id"])
def test_bad_shard(problem, tmp_path, capsys):
    data = write_shards(str(tmp_path / "data"), [300, 300, 300])
    bad = os.path.join(data, "edufineweb_train_000002.npy")
    good = np.load(bad)
    if problem == "dtype":
        np.save(bad, good.astype(np.int32))
    elif problem == "empty":
        np.save(bad, good[:0])
    elif problem == "unreadable":
        with open(bad, "wb") as f:
            f.write(b"not a numpy file")
    elif problem == "2-D":
        np.save(bad, good.reshape(10, 30))
    else:
        good[5] = 50300  # in the padded rows, but not a real token
        np.save(bad, good)
    expected = {"dtype": "int32", "empty": "an empty shard", "unreadable": "unreadable", "2-D": "2-D",
                "token id": "token id 50300"}[problem]
    expect_error([*TINY, "--data", data, "--max-steps", "20", "--log-dir", str(tmp_path)], capsys, bad, expected)


def test_too_little_data_in_all_shards_together(tmp_path, capsys):
    data = write_shards(str(tmp_path / "data"), [300, 20, 12])  # 32 train tokens; one 2 x 16 slice needs 33
    expect_error([*TINY, "--data", data, "--log-dir", str(tmp_path)], capsys, "edufineweb_train_000001.npy and "
                 "1 more shard(s): 32 tokens, fewer than one batch-size x seq-len x world-size slice + 1 = 33")


def test_val_tokens_below_one_batch_is_an_error_not_nan(shards, tmp_path, capsys):
    expect_error([*TINY, "--data", shards, "--val-tokens", "16", "--log-dir", str(tmp_path)], capsys,
                 "--val-tokens 16", "one batch-size x seq-len x world-size batch of 32 tokens")


def test_indivisible_total_batch(shards, tmp_path, capsys):
    expect_error([*TINY, "--data", shards, "--total-batch-size", "100", "--log-dir", str(tmp_path)], capsys,
                 "--total-batch-size 100", "not a multiple", "32")


def test_resume_refuses_a_model_of_another_shape(shards, tmp_path, capsys):
    assert run([*TINY, "--data", shards, "--max-steps", "1", "--log-dir", str(tmp_path)]) == 0
    expect_error([*TINY, "--data", shards, "--n-embd", "64", "--resume", "auto", "--log-dir", str(tmp_path)], capsys,
                 "ckpt_000001.pt", "n_embd=32", "n_embd=64")
    expect_error([*TINY, "--data", shards, "--resume", str(tmp_path / "none.pt"), "--log-dir", str(tmp_path)],
                 capsys, "none.pt", "no such file")
    # without --resume, a log dir that holds checkpoints is not silently reused
    expect_error([*TINY, "--data", shards, "--log-dir", str(tmp_path)], capsys, "ckpt_000001.pt", "--resume auto")


def test_resuming_an_older_checkpoint_beside_later_ones_is_refused(shards, tmp_path, capsys):
    """Going back to step 2 (say, after a divergence) while ckpt 4 is still there would let pruning
    delete the new run's checkpoints and a later --resume auto pick the abandoned run: refuse."""
    common = [*TINY, "--data", shards, "--checkpoint-every", "2", "--log-dir", str(tmp_path)]
    assert run([*common, "--max-steps", "4"]) == 0
    expect_error([*common, "--max-steps", "3", "--resume", str(tmp_path / "ckpt_000002.pt")], capsys,
                 "continues from step 2", "ckpt_000004.pt", "move them away")
    os.rename(tmp_path / "ckpt_000004.pt", tmp_path / "abandoned.pt.bak")
    assert run([*common, "--max-steps", "3", "--resume", str(tmp_path / "ckpt_000002.pt")]) == 0
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_000002.pt", "ckpt_000003.pt"]
    assert sorted(train_losses(tmp_path)) == [0, 1, 2]  # the abandoned run's step-3 record is gone


def test_resume_keeps_this_runs_weight_decay(shards, tmp_path):
    """Optimizer.load_state_dict alone would bring back the checkpoint's weight decay."""
    common = [*TINY, "--data", shards, "--log-dir", str(tmp_path)]
    assert run([*common, "--max-steps", "1"]) == 0
    seen = []
    real_step = tg.train_step

    def spy(model, optimizer, *a, **k):
        seen.append([g["weight_decay"] for g in optimizer.param_groups])
        return real_step(model, optimizer, *a, **k)

    tg.train_step = spy
    try:
        assert run([*common, "--max-steps", "2", "--resume", "auto", "--weight-decay", "0.0"]) == 0
    finally:
        tg.train_step = real_step
    assert seen == [[0.0, 0.0]]
    ckpt = torch.load(tmp_path / "ckpt_000002.pt", weights_only=True)
    assert ckpt["optimizer"]["state"]  # the moments did come from the checkpoint and were saved again


def test_other_files_named_ckpt_are_not_checkpoints(shards, tmp_path, capsys):
    common = [*TINY, "--data", shards, "--checkpoint-every", "2", "--log-dir", str(tmp_path)]
    assert run([*common, "--max-steps", "2"]) == 0
    (tmp_path / "ckpt_best.pt").write_bytes(b"the user's own file")  # sorts after ckpt_000002.pt by name
    code, out, err = run([*common, "--max-steps", "3", "--resume", "auto"], capsys)
    assert code == 0, err
    assert f"resumed from {tmp_path / 'ckpt_000002.pt'} at step 2" in out
    assert (tmp_path / "ckpt_best.pt").read_bytes() == b"the user's own file"  # never pruned either


@pytest.mark.parametrize("native, flag, expected", [("1", [], "autocast torch.bfloat16"),
                                                     ("0", [], "autocast off (float32)"),
                                                     ("1", ["--dtype", "float32"], "autocast off (float32)"),
                                                     ("0", ["--dtype", "bfloat16"], "autocast torch.bfloat16")])
def test_dtype_auto_is_bf16_on_a_cpu_only_where_it_is_native(shards, tmp_path, capsys, monkeypatch, native, flag,
                                                             expected):
    """--dtype auto on the CPU: bfloat16 autocast where the CPU multiplies bfloat16 natively (here the
    answer is forced with GPT2_CPU_BF16; utils' own tests check the detection), float32 elsewhere; an
    explicit --dtype always wins. The step really runs under that autocast."""
    monkeypatch.setenv("GPT2_CPU_BF16", native)
    seen, real_step = [], tg.train_step

    def spy(model, optimizer, loader, grad_accum_steps, lr, grad_clip, autocast_dtype):
        seen.append(autocast_dtype)
        return real_step(model, optimizer, loader, grad_accum_steps, lr, grad_clip, autocast_dtype)

    monkeypatch.setattr(tg, "train_step", spy)
    code, out, _ = run([*TINY, "--data", shards, "--max-steps", "1", *flag, "--log-dir", str(tmp_path)], capsys)
    assert code == 0 and f"device: cpu, {expected}" in out
    assert seen == [torch.bfloat16 if "bfloat16" in expected else None]


def test_bad_flag_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        tg.parse_args(["--batch-size", "0"])
    assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err


# ---------------------------------------------------------------- evals: HellaSwag, torch.compile


def test_hellaswag_eval_is_logged(shards, tmp_path):
    import hellaswag

    data_file = write_hellaswag(tmp_path / "hs.jsonl")
    args = [*TINY, "--data", shards, "--max-steps", "2", "--hellaswag", "--hellaswag-file", data_file,
            "--eval-every", "2", "--log-dir", str(tmp_path / "run")]
    assert run(args) == 0
    logged = [r["hellaswag"] for r in read_log(tmp_path / "run") if "hellaswag" in r]
    assert len(logged) == 2  # steps 0 and 2
    model = GPT.from_pretrained(str(tmp_path / "run" / "ckpt_000002.pt"))  # the weights of the last eval
    expected = hellaswag.evaluate(model, hellaswag.load_examples(data_file=data_file), "cpu")
    assert logged[-1] == expected["acc_norm"]


def test_two_ranks_on_separate_disks_get_hellaswag_from_rank0_and_resume_together(shards, tmp_path):
    """As on two nodes with their own disks: only rank 0 has the HellaSwag file. Rank 0 reads it and
    sends the examples, so both ranks evaluate (the counts are summed across them); a resume is
    found by rank 0 and read by both."""
    import hellaswag

    data_file = write_hellaswag(tmp_path / "hs.jsonl")
    wrapper = tmp_path / "node_local.py"
    wrapper.write_text(f"""
import functools, os, sys
sys.path.insert(0, {ROOT!r})
import hellaswag, train_gpt2
cache = os.path.join({str(tmp_path)!r}, "cache_rank" + os.environ["RANK"])  # rank 1's stays empty
os.makedirs(cache, exist_ok=True)
if os.environ["RANK"] == "0" and not os.path.exists(os.path.join(cache, "hellaswag_val.jsonl")):
    os.link({data_file!r}, os.path.join(cache, "hellaswag_val.jsonl"))
hellaswag.DATA_URL = "file:///nonexistent/{{split}}.jsonl"  # no download either
hellaswag.load_examples = functools.partial(hellaswag.load_examples, cache_dir=cache)
sys.exit(train_gpt2.main(sys.argv[1:]))
""")
    common = [*TINY, "--data", shards, "--hellaswag", "--eval-every", "2", "--checkpoint-every", "2",
              "--log-dir", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for steps, extra in ((2, []), (4, ["--resume", "auto"])):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(wrapper), *common, "--max-steps", str(steps), *extra],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "skipped" not in proc.stdout
    logged = {r["step"]: r["hellaswag"] for r in read_log(tmp_path / "run") if "hellaswag" in r}
    assert sorted(logged) == [0, 2, 4]
    model = GPT.from_pretrained(str(tmp_path / "run" / "ckpt_000004.pt"))
    expected = hellaswag.evaluate(model, hellaswag.load_examples(data_file=data_file), "cpu")
    assert logged[4] == expected["acc_norm"]
    assert f"({expected['correct_norm']}/4)" in proc.stdout  # all 4 examples, 2 scored by each rank


def test_hellaswag_unavailable_is_skipped_with_one_line(shards, tmp_path, monkeypatch, capsys):
    import functools

    import hellaswag

    # the real download path, offline: an empty cache and a URL that cannot be fetched
    monkeypatch.setattr(hellaswag, "DATA_URL", (tmp_path / "missing_{split}.jsonl").as_uri())
    monkeypatch.setattr(hellaswag, "load_examples", functools.partial(hellaswag.load_examples,
                                                                      cache_dir=str(tmp_path / "cache")))
    code, out, _ = run([*TINY, "--data", shards, "--max-steps", "1", "--hellaswag", "--log-dir", str(tmp_path)],
                       capsys)
    assert code == 0
    assert out.count("hellaswag: skipped (could not download") == 1 and "acc_norm" not in out
    assert not [r for r in read_log(tmp_path) if "hellaswag" in r]


def test_compile_gives_the_eager_numbers_for_training_val_loss_hellaswag_and_samples(shards, tmp_path, capsys):
    """torch.compile on the CPU (inductor, needs a C++ compiler): same losses as eager, and the
    evals (val loss, HellaSwag, sampling) work with no recompilation storm."""
    data_file = write_hellaswag(tmp_path / "hs.jsonl")
    common = [*TINY, "--data", shards, "--max-steps", "3", "--eval-every", "2", "--sample-every", "2",
              "--num-samples", "2", "--hellaswag", "--hellaswag-file", data_file]
    assert run([*common, "--no-compile", "--log-dir", str(tmp_path / "eager")]) == 0
    eager_out = capsys.readouterr().out
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert run([*common, "--compile", "--log-dir", str(tmp_path / "compiled")]) == 0
    compiled_out = capsys.readouterr().out
    assert "compile on" in compiled_out
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    assert [sorted(r) for r in eager] == [sorted(r) for r in compiled]
    for a, b in zip(eager, compiled):
        for key in ("train_loss", "val_loss", "hellaswag"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5)
    samples = lambda out: [line for line in out.splitlines() if line.startswith("rank 0 sample")]  # noqa: E731
    assert len(samples(eager_out)) == 4 and samples(compiled_out) == samples(eager_out)
    # one graph for training and one for the no_grad val loss: nothing recompiled per eval or sample
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2, dict(torch._dynamo.utils.counters["stats"])
