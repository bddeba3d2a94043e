"""train_gpt2.py when things go wrong: two runs in one --log-dir, a full disk, signals during evals
and teardown, weights that turn non-finite, bad input, paths with glob characters.

Processes and signals are real: the runs that get signalled are subprocesses, and the moment of each
signal is fixed by a pause point (utils.pause_point: the program creates a file and waits while it
exists), never by a sleep or by winning a race. The rest runs main(argv) in-process.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import logdir
import train_gpt2 as tg
from conftest import ROOT, read_log, write_hellaswag, write_shards

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "16", "--batch-size", "2",
        "--total-batch-size", "64", "--no-hellaswag", "--num-samples", "0", "--eval-every", "0",
        "--val-tokens", "64", "--seed", "7"]
CONSTANT_LR = ["--warmup-steps", "0", "--min-lr-ratio", "1"]  # the schedule does not depend on --max-steps

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # the val shard (400 tokens) holds 12 batches of 2 x 16: an eval that reads them all cannot end at once
    return write_shards(str(tmp_path_factory.mktemp("shards")), [400, 300, 250, 350])


def run(argv, capsys=None):
    """main(argv) in this process: its exit status (argparse's too), and (out, err) with capsys."""
    try:
        code = tg.main(argv)
    except SystemExit as e:  # argparse refuses a flag's value
        code = e.code
    return code if capsys is None else (code, *capsys.readouterr())


def records(log_dir, key):
    return {r["step"]: r[key] for r in read_log(log_dir) if key in r}


def snapshot(directory):
    """Every file's name and bytes: to show that a refused run touched nothing."""
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def assert_same_run(log_a, log_b):
    """Two logs of the same run: the same records, losses equal to float32 rounding."""
    a, b = read_log(log_a), read_log(log_b)
    assert [sorted(r) for r in a] == [sorted(r) for r in b] and [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss", "hellaswag"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-6), (ra, rb)


# ---------------------------------------------------------------- real processes


class Program:
    """A real process in its own session, output in a file, paused at GPT2_PAUSE_AT if given."""

    def __init__(self, tmp_path, name, cmd, pause_at=None, env=None):
        self.out_path, self.pause_file = tmp_path / f"{name}.out", tmp_path / f"{name}.pause"
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        if pause_at:
            env.update(GPT2_PAUSE_AT=pause_at, GPT2_PAUSE_FILE=str(self.pause_file))
        with open(self.out_path, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def output(self):
        return self.out_path.read_text()

    def wait_for(self, condition, what, timeout=300):
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {what}:\n{self.output()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.output()}"
            time.sleep(0.02)

    def pause(self, nth=1, files=None):
        """Wait until the program stands at its nth pause (letting the earlier ones go on). files: one
        pause file per rank (under torchrun), each rank pausing at the same point of the same round."""
        files = files or [self.pause_file]
        for i in range(nth):
            self.wait_for(lambda: all(f.exists() for f in files), f"pause {i + 1} of {nth}")
            if i < nth - 1:
                for f in files:
                    f.unlink()

    def finish(self, files=None, timeout=300):
        """Let the program go on from its pause and wait for its exit. Returns (exit status, how many
        more times it paused on the way, each let go at once)."""
        files, more, deadline = files or [self.pause_file], 0, time.monotonic() + timeout
        for f in files:
            f.unlink()
        while self.proc.poll() is None:
            for f in files:
                if f.exists():
                    more += 1
                    f.unlink()
            assert time.monotonic() < deadline, f"timed out waiting for the exit:\n{self.output()}"
            time.sleep(0.02)
        return self.proc.returncode, more

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture
def start(tmp_path):
    """start(name, argv, pause_at=None): train_gpt2.py as a real process; all killed at the end."""
    started = []

    def start(name, argv, pause_at=None, cmd=None, env=None):
        cmd = cmd or [sys.executable, os.path.join(ROOT, "train_gpt2.py")]
        started.append(Program(tmp_path, name, [*cmd, *argv], pause_at, env))
        return started[-1]

    yield start
    for program in started:
        program.kill()


# ---------------------------------------------------------------- 1. paths are names, not globs


def test_glob_characters_in_log_dir_and_data_are_taken_literally(tmp_path, capsys):
    # decoys that the unescaped patterns `exp[1]/ckpt_*.pt` and `data[1]/*.npy` would match instead
    data = write_shards(str(tmp_path / "data[1]"), [400, 300, 250, 350])
    write_shards(str(tmp_path / "data1"), [400, 600])
    log_dir, decoy = tmp_path / "exp[1]", tmp_path / "exp1"
    decoy.mkdir()
    (decoy / "ckpt_000009.pt").write_bytes(b"another run's checkpoint")
    common = [*TINY, "--data", data, "--checkpoint-every", "1", "--keep-checkpoints", "2", "--log-dir", str(log_dir)]
    code, out, err = run([*common, "--max-steps", "2"], capsys)
    assert code == 0, err
    assert f"data: {data}: 3 train shard(s), 900 tokens" in out
    (log_dir / "ckpt_000003.pt.tmp").write_bytes(b"a save cut short")
    code, out, err = run([*common, "--max-steps", "4", "--resume", "auto"], capsys)
    assert code == 0, err
    assert f"resumed from {log_dir / 'ckpt_000002.pt'} at step 2" in out
    assert sorted(os.listdir(log_dir)) == ["ckpt_000003.pt", "ckpt_000004.pt", "log.jsonl"]  # pruned, cleaned
    assert sorted(records(log_dir, "train_loss")) == [0, 1, 2, 3]
    assert os.listdir(decoy) == ["ckpt_000009.pt"]


# ---------------------------------------------------------------- 2. one run per --log-dir


def test_a_second_run_is_refused_while_the_first_holds_the_log_dir_and_a_requeued_one_waits(shards, tmp_path, start):
    log_dir = tmp_path / "run"
    common = [*TINY, "--data", shards, "--checkpoint-every", "2", *CONSTANT_LR, "--log-dir", str(log_dir)]
    first = start("first", [*common, "--max-steps", "100000"], pause_at="checkpoint")
    first.pause()  # about to write ckpt_000002.pt
    (log_dir / "ckpt_000002.pt.tmp").write_bytes(b"the first run's checkpoint, half written")
    before = snapshot(log_dir)

    second = start("second", [*common, "--max-steps", "4"])  # a fresh run in the same directory
    assert second.proc.wait(timeout=300) == 2
    assert (f"error: --log-dir {log_dir} is in use by another run (host {socket.gethostname()}, "
            f"pid {first.proc.pid})") in second.output()
    assert snapshot(log_dir) == before  # its partial checkpoint included

    requeued = start("requeued", [*common, "--max-steps", "6", "--resume", "auto", "--wait-for-lock"])
    requeued.wait_for(lambda: "waiting until it ends (--wait-for-lock)" in requeued.output(), "the wait")
    first.proc.send_signal(signal.SIGTERM)  # a preemption: the first run writes its checkpoints and exits
    code, _ = first.finish()
    assert code == 0 and "stopped by a signal" in first.output()
    # the first run's last checkpoint, from its output: the requeued run may already have written more
    k = int(re.findall(r"^checkpoint: .*ckpt_(\d+)\.pt$", first.output(), re.M)[-1])
    assert requeued.proc.wait(timeout=300) == 0, requeued.output()
    assert f"resumed from {log_dir / f'ckpt_{k:06d}.pt'} at step {k}" in requeued.output()
    assert sorted(records(log_dir, "train_loss")) == list(range(6))  # every step once: no interleaving
    assert not (log_dir / ".lock").exists()  # removed at exit
    reference = tmp_path / "reference"
    assert run([*common[:-1], str(reference), "--max-steps", "6"]) == 0
    assert records(log_dir, "train_loss") == pytest.approx(records(reference, "train_loss"), rel=1e-6)


def test_a_killed_runs_lock_is_not_stale_and_a_signal_ends_a_wait(shards, tmp_path, start, capsys):
    log_dir = tmp_path / "run"
    common = [*TINY, "--data", shards, "--log-dir", str(log_dir)]
    holder = start("holder", [*common, "--max-steps", "100000", "--checkpoint-every", "2"], pause_at="checkpoint")
    holder.pause()
    waiter = start("waiter", [*common, "--max-steps", "4", "--resume", "auto", "--wait-for-lock"])
    waiter.wait_for(lambda: "waiting until it ends" in waiter.output(), "the wait")
    waiter.proc.send_signal(signal.SIGTERM)  # preempted while it waits: it did nothing, and says so
    assert waiter.proc.wait(timeout=300) == 0
    assert f"stopped by a signal while waiting for --log-dir {log_dir}; nothing was done" in waiter.output()
    holder.kill()  # kill -9: no handler runs, the lock file stays behind
    assert (log_dir / ".lock").exists()
    code, out, err = run([*common, "--max-steps", "1", "--resume", "auto"], capsys)  # the kernel released the lock
    assert code == 0, err
    assert not (log_dir / ".lock").exists()


def test_a_filesystem_without_flock_runs_unlocked_with_a_warning(shards, tmp_path, capsys, monkeypatch):
    """As on Lustre mounted without -o flock, where flock fails with ENOSYS."""
    def no_flock(fd, operation):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(logdir.fcntl, "flock", no_flock)
    code, out, err = run([*TINY, "--data", shards, "--max-steps", "1", "--log-dir", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert f"warning: cannot lock --log-dir {tmp_path / 'run'} (Function not implemented)" in out
    assert (tmp_path / "run" / "ckpt_000001.pt").exists()


# ---------------------------------------------------------------- 3. a full disk


def test_a_full_disk_during_a_checkpoint_is_an_error_and_the_run_resumes_when_there_is_room(shards, tmp_path, start,
                                                                                          capsys):
    log_dir = tmp_path / "run"
    common = [*TINY, "--data", shards, "--checkpoint-every", "2", "--log-dir", str(log_dir)]
    program = start("full", [*common, "--max-steps", "6"], pause_at="checkpoint")
    program.pause(nth=2)  # ckpt_000002.pt is written; ckpt_000004.pt is next
    (log_dir / "ckpt_000004.pt.tmp").symlink_to("/dev/full")  # every write there fails: ENOSPC, for real
    code, _ = program.finish()
    out = program.output()
    assert code == 2 and "Traceback" not in out, out
    assert f"error: checkpoint at step 4: [Errno 28] no space left on device in {log_dir}: writing ckpt_000004.pt " \
           "needs about" in out
    size = (log_dir / "ckpt_000002.pt").stat().st_size  # the space a checkpoint really takes
    needed = float(re.search(r"needs about ([\d,.]+) MB", out).group(1).replace(",", "")) * 1e6
    assert abs(needed - size) < 0.02 * size
    assert sorted(os.listdir(log_dir)) == ["ckpt_000002.pt", "log.jsonl"]  # no partial file; the older one intact
    assert torch.load(log_dir / "ckpt_000002.pt", weights_only=True)["step"] == 2

    # the next --resume auto: the disk is still full (the log cannot be rewritten), and a save killed
    # mid-write left its partial file. That file goes first (it may be what fills the disk).
    partial = log_dir / "ckpt_000006.pt.tmp"
    partial.write_bytes(b"half a checkpoint")
    (log_dir / "log.jsonl.tmp").symlink_to("/dev/full")
    log_before = (log_dir / "log.jsonl").read_bytes()
    code, out, err = run([*common, "--max-steps", "6", "--resume", "auto"], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"no space left on device in {log_dir}: writing log.jsonl" in err
    assert not partial.exists() and (log_dir / "log.jsonl").read_bytes() == log_before
    assert not os.path.lexists(log_dir / "log.jsonl.tmp")  # atomic_write removed it: there is room again
    code, out, err = run([*common, "--max-steps", "6", "--resume", "auto"], capsys)
    assert code == 0, err
    assert f"resumed from {log_dir / 'ckpt_000002.pt'} at step 2" in out
    assert sorted(records(log_dir, "train_loss")) == list(range(6))


# ---------------------------------------------------------------- 4. signals during evals


EVAL_CASES = {
    # pause point: (extra flags, which pause is the one at step 2's evals, the record that must be missing)
    "val_batch": (["--eval-every", "2", "--val-tokens", "100000"], 12 + 1, "val_loss"),  # step 0 runs 12 batches
    "hellaswag": (["--eval-every", "2", "--hellaswag"], 1 + 1, "hellaswag"),
    "sample_token": (["--num-samples", "1", "--sample-every", "2", "--sample-tokens", "8"], 1, None),
}


@pytest.mark.parametrize("point", EVAL_CASES)
def test_sigterm_during_an_eval_stops_within_one_batch_and_checkpoints_the_last_step(point, shards, tmp_path, start,
                                                                                     capsys):
    extra, nth, missing = EVAL_CASES[point]
    if "--hellaswag" in extra:
        extra = [*extra, "--hellaswag-file", write_hellaswag(tmp_path / "hs.jsonl", n=2)]
    log_dir = tmp_path / "run"
    common = [*TINY, "--data", shards, "--max-steps", "4", "--checkpoint-every", "0", *extra]
    program = start("eval", [*common, "--log-dir", str(log_dir)], pause_at=point)
    program.pause(nth)  # in step 2's evals: one val batch, or the HellaSwag eval, or one sample token away
    program.proc.send_signal(signal.SIGTERM)
    code, more = program.finish()
    out = program.output()
    assert code == 0, out
    assert more == 0  # no further val batch, sample token or eval after the signal
    assert "stopped by a signal during the evals at step 2; continue with --resume auto" in out
    assert [p.name for p in log_dir.glob("*.pt")] == ["ckpt_000002.pt"]  # the last completed step's
    assert sorted(records(log_dir, "train_loss")) == [0, 1]
    if missing:
        assert sorted(records(log_dir, missing)) == [0]  # nothing partial logged at step 2
    else:
        assert "rank 0 sample" not in out
    # the resumed run redoes step 2's evals: its log is that of a run never stopped
    assert run([*common, "--log-dir", str(log_dir), "--resume", "auto"]) == 0
    assert run([*common, "--log-dir", str(tmp_path / "reference")]) == 0
    assert_same_run(tmp_path / "reference", log_dir)


def test_sigterm_during_an_eval_under_torchrun_stops_every_rank_and_torchrun_exits_1(shards, tmp_path, start):
    """Each worker gets SIGTERM (as from a scheduler that signals every process of the job) while it
    stands after a val batch, and so does torchrun. Every rank stops after that batch (the flag
    travels in val_loss's all-reduce), rank 0 writes the checkpoint, both workers exit 0; torchrun,
    which got SIGTERM itself, exits 1 all the same: that is what a scheduler sees from it."""
    wrapper = tmp_path / "worker.py"  # records each worker's exit status; one pause file per rank
    wrapper.write_text(f"""
import os, runpy, sys
sys.path.insert(0, {ROOT!r})
os.environ["GPT2_PAUSE_FILE"] += os.environ["RANK"]
try:
    runpy.run_path({os.path.join(ROOT, "train_gpt2.py")!r}, run_name="__main__")
except SystemExit as e:
    open({str(tmp_path)!r} + "/exit_rank" + os.environ["RANK"], "w").write(str(e.code))
    raise
""")
    log_dir = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper)]
    program = start("ddp", [*TINY, "--data", shards, "--max-steps", "4", "--eval-every", "2", "--val-tokens",
                            "100000", "--checkpoint-every", "0", "--log-dir", str(log_dir)],
                    pause_at="val_batch", cmd=torchrun)
    files = [tmp_path / f"ddp.pause{rank}" for rank in (0, 1)]
    program.pause(6 + 1, files)  # step 0's eval: 6 batches of 2 x 16 per rank; then step 2's first
    workers = subprocess.run(["pgrep", "-P", str(program.proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    for pid in [*workers, program.proc.pid]:
        os.kill(int(pid), signal.SIGTERM)
    code, more = program.finish(files)
    out = program.output()
    assert more == 0, out  # neither rank ran another val batch
    assert [(tmp_path / f"exit_rank{r}").read_text() for r in (0, 1)] == ["0", "0"], out
    assert code == 1, out  # torchrun's own status after a SIGTERM (torch.distributed.elastic's SignalException)
    assert "stopped by a signal during the evals at step 2" in out
    assert [p.name for p in log_dir.glob("*.pt")] == ["ckpt_000002.pt"]
    assert torch.load(log_dir / "ckpt_000002.pt", weights_only=True)["step"] == 2
    assert sorted(records(log_dir, "val_loss")) == [0]


# ---------------------------------------------------------------- 8. exit status


def test_a_second_signal_during_teardown_still_exits_0(shards, tmp_path, start):
    log_dir = tmp_path / "run"
    program = start("teardown", [*TINY, "--data", shards, "--max-steps", "100000", "--log-dir", str(log_dir)],
                    pause_at="exit")
    program.wait_for(lambda: (log_dir / "log.jsonl").exists() and (log_dir / "log.jsonl").read_text().count("\n") >= 2,
                     "two steps")
    program.proc.send_signal(signal.SIGTERM)
    program.pause()  # the checkpoint is written; main's teardown is under way
    assert list(log_dir.glob("ckpt_*.pt"))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):  # a scheduler's, torchrun's, a user's Ctrl-C
        program.proc.send_signal(sig)
    code, _ = program.finish()
    assert code == 0, program.output()
    assert "Traceback" not in program.output()


# ---------------------------------------------------------------- 5. non-finite weights


def test_an_update_that_makes_the_weights_non_finite_writes_no_checkpoint(shards, tmp_path, capsys, monkeypatch):
    """The loss and gradient norm are looked at before optimizer.step(); its update can still overflow
    (the parse-time checks keep the flags finite, so here a NaN is written into a weight after a
    real step, as an overflowing update would leave it, and the step's own numbers stay finite)."""
    real_step, steps = tg.train_step, []

    def overflowing_step(model, *a, **k):
        loss, norm = real_step(model, *a, **k)
        steps.append(1)
        if len(steps) == bad_step + 1:
            with torch.no_grad():
                next(model.parameters())[0, 0] = float("nan")
        return loss, norm

    monkeypatch.setattr(tg, "train_step", overflowing_step)
    bad_step = 0
    code, _, err = run([*TINY, "--data", shards, "--max-steps", "1", "--log-dir", str(tmp_path / "a")], capsys)
    assert code == 1
    assert "error: step 0: the update made the weights inf or NaN" in err
    assert f"none was written in {tmp_path / 'a'} yet" in err
    assert not list((tmp_path / "a").glob("ckpt_*"))
    # with --keep-checkpoints 1 the last good checkpoint stays, and the message names it
    steps.clear()
    bad_step = 3
    code, _, err = run([*TINY, "--data", shards, "--max-steps", "6", "--checkpoint-every", "2", "--keep-checkpoints",
                        "1", "--log-dir", str(tmp_path / "b")], capsys)
    good = tmp_path / "b" / "ckpt_000002.pt"
    assert code == 1
    assert "error: step 3: the update made the weights inf or NaN" in err
    assert f"the newest one, {good}, is still good" in err
    assert [p.name for p in (tmp_path / "b").glob("ckpt_*")] == [good.name]
    assert all(t.isfinite().all() for t in torch.load(good, weights_only=True)["model"].values())


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "nan"), ("--lr", "0"), ("--lr", "-1e-3"),
                                        ("--min-lr-ratio", "1.5"), ("--min-lr-ratio", "-0.1"),
                                        ("--min-lr-ratio", "nan"), ("--weight-decay", "-0.1"),
                                        ("--weight-decay", "inf"), ("--grad-clip", "-1"), ("--grad-clip", "inf"),
                                        ("--peak-tflops", "0")])
def test_float_flags_out_of_range_are_usage_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        tg.parse_args([f"{flag}={value}"])  # with '=': argparse reads a lone -1e-3 as a flag
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: expected a finite number" in err and repr(value) in err


@pytest.mark.parametrize("argv", [["--lr", "1e38"], ["--lr", "1e37", "--weight-decay", "100"]])
def test_a_learning_rate_that_overflows_adamw_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:  # rather than optimizer.step()'s "cannot be converted to type float"
        tg.parse_args(argv)
    assert e.value.code == 2 and f"--lr {float(argv[1]):g} with --weight-decay" in capsys.readouterr().err


def test_float_flags_at_the_ends_of_their_ranges_are_accepted():
    args = tg.parse_args(["--lr", "1e-9", "--min-lr-ratio", "0", "--weight-decay", "0", "--grad-clip", "0"])
    assert (args.lr, args.min_lr_ratio, args.weight_decay, args.grad_clip) == (1e-9, 0, 0, 0)
    assert tg.parse_args(["--min-lr-ratio", "1"]).min_lr_ratio == 1


# ---------------------------------------------------------------- 6. bad input: error, not traceback


@pytest.fixture(scope="module")
def good_checkpoint(shards, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("good")
    assert run([*TINY, "--data", shards, "--max-steps", "1", "--log-dir", str(log_dir)]) == 0
    return torch.load(log_dir / "ckpt_000001.pt", weights_only=False)


def hf_dir(path, config=None, weights=None):
    """A Hugging Face style directory: config.json (a tiny GPT-2's unless given) and a weights file."""
    path.mkdir()
    config = config or dict(n_positions=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)
    (path / "config.json").write_text(json.dumps(config))
    for name, data in (weights or {}).items():
        (path / name).write_bytes(data)
    return str(path)


def truncated_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"transformer.wte.weight": torch.zeros(100, 32)}, str(tmp_path / "whole.safetensors"))
    data = (tmp_path / "whole.safetensors").read_bytes()
    return data[: len(data) // 2]


def bad_input(case, tmp_path, good_checkpoint):
    """(extra argv, fragments the error must hold) for each kind of bad input."""
    log_dir = tmp_path / "run"
    if case == "log dir is a file":
        log_dir.write_text("not a directory")
        return ["--log-dir", str(log_dir)], [f"--log-dir {log_dir} is a file"]
    if case == "log dir cannot be created":  # as root, a read-only mode would not stop us: a parent that is a file
        (tmp_path / "file").write_text("")
        return ["--log-dir", str(tmp_path / "file" / "run")], [f"--log-dir {tmp_path / 'file' / 'run'}: cannot write"]
    if case == "device foo":
        return ["--device", "foo"], ["--device foo: not a device"]
    if case == "device mps":
        return ["--device", "mps"], ["--device mps: no MPS device is available"]
    if case == "empty sample prompt":
        return ["--num-samples", "1", "--sample-prompt", ""], ["--sample-prompt is empty"]
    if case == "truncated model.safetensors":
        d = hf_dir(tmp_path / "hf", weights={"model.safetensors": truncated_safetensors(tmp_path)})
        return ["--init-from", d], [os.path.join(d, "model.safetensors"), "unreadable weights file"]
    if case == "garbage pytorch_model.bin":
        d = hf_dir(tmp_path / "hf", weights={"pytorch_model.bin": b"not a torch file"})
        return ["--init-from", d], [os.path.join(d, "pytorch_model.bin"), "unreadable weights file"]
    if case == "config.json n_head 0":
        d = hf_dir(tmp_path / "hf", config=dict(n_positions=64, vocab_size=50257, n_layer=2, n_head=0, n_embd=32))
        return ["--init-from", d], [os.path.join(d, "config.json"), "n_head=0 is not a positive integer"]
    if case == "config.json n_layer a list":
        d = hf_dir(tmp_path / "hf", config=dict(n_positions=64, vocab_size=50257, n_layer=[2], n_head=2, n_embd=32))
        return ["--init-from", d], [os.path.join(d, "config.json"), "n_layer=[2] is not a positive integer"]
    if case.startswith("checkpoint without"):
        key = case.split()[-1]
        log_dir.mkdir()
        torch.save({k: v for k, v in good_checkpoint.items() if k != key}, log_dir / "ckpt_000001.pt")
        return ["--log-dir", str(log_dir), "--resume", "auto"], [str(log_dir / "ckpt_000001.pt"), repr(key)]
    if case == "checkpoint with a broken loader state":
        log_dir.mkdir()
        torch.save({**good_checkpoint, "loader": {"epoch": 0}}, log_dir / "ckpt_000001.pt")
        return ["--log-dir", str(log_dir), "--resume", "auto"], [f"--resume {log_dir / 'ckpt_000001.pt'}: "]
    raise AssertionError(case)


BAD_INPUT = ["log dir is a file", "log dir cannot be created", "device foo", "device mps", "empty sample prompt",
             "truncated model.safetensors", "garbage pytorch_model.bin", "config.json n_head 0",
             "config.json n_layer a list", "checkpoint without optimizer", "checkpoint without loader",
             "checkpoint with a broken loader state"]


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_an_error_message_not_a_traceback(case, shards, tmp_path, capsys, good_checkpoint):
    if case == "device mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    extra, fragments = bad_input(case, tmp_path, good_checkpoint)
    argv = [*TINY, "--data", shards, "--max-steps", "2", "--log-dir", str(tmp_path / "run"), *extra]
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    code, out, err = run(argv, capsys)
    assert code == 2, out + err
    assert "error: " in err and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before  # nothing touched


def test_a_corrupt_line_in_the_log_does_not_block_the_resume(shards, tmp_path, capsys):
    common = [*TINY, "--data", shards, "--checkpoint-every", "2", *CONSTANT_LR, "--log-dir", str(tmp_path)]
    assert run([*common, "--max-steps", "3"]) == 0
    lines = (tmp_path / "log.jsonl").read_bytes().splitlines(keepends=True)
    corrupt = b'{"step": 1, "train_lo\xff\x00\x00 a damaged block\n'
    lines[1] = corrupt  # step 1's record
    (tmp_path / "log.jsonl").write_bytes(b"".join(lines) + b'{"step": 3, "train_loss"')  # and a cut-short last line
    code, out, err = run([*common, "--max-steps", "4", "--resume", "auto"], capsys)
    assert code == 0, err
    assert f"warning: {tmp_path / 'log.jsonl'} line 2 is not a log record: moved to {tmp_path / 'log.jsonl.bad'}" in out
    assert (tmp_path / "log.jsonl.bad").read_bytes() == corrupt
    assert sorted(records(tmp_path, "train_loss")) == [0, 2, 3]  # the good records kept, the run continued


# ---------------------------------------------------------------- 7, 9, 10: resume and the log


def test_max_steps_below_the_checkpoint_is_an_error_that_touches_nothing(shards, tmp_path, capsys):
    common = [*TINY, "--data", shards, "--checkpoint-every", "2", "--log-dir", str(tmp_path)]
    assert run([*common, "--max-steps", "4"]) == 0
    before = snapshot(tmp_path)
    code, out, err = run([*common, "--max-steps", "3", "--resume", "auto"], capsys)
    assert code == 2
    assert f"error: --max-steps 3 is below the step of the checkpoint to resume, {tmp_path / 'ckpt_000004.pt'} " \
           "(step 4)" in err
    assert snapshot(tmp_path) == before


def test_a_fresh_run_keeps_an_earlier_runs_log(shards, tmp_path, capsys):
    common = [*TINY, "--data", shards, "--log-dir", str(tmp_path)]
    assert run([*common, "--max-steps", "2"]) == 0
    earlier = (tmp_path / "log.jsonl").read_bytes()
    (tmp_path / "ckpt_000002.pt").rename(tmp_path.parent / f"{tmp_path.name}_moved.pt")  # checkpoints moved away
    code, out, _ = run([*common, "--max-steps", "1"], capsys)
    assert code == 0
    assert f"{tmp_path / 'log.jsonl'} of an earlier run is kept as {tmp_path / 'log.jsonl.1'}" in out
    assert (tmp_path / "log.jsonl.1").read_bytes() == earlier
    assert sorted(records(tmp_path, "train_loss")) == [0]


def test_resuming_a_fine_tune_does_not_need_its_init_from_source(shards, tmp_path, capsys):
    assert run([*TINY, "--data", shards, "--max-steps", "1", "--log-dir", str(tmp_path / "base")]) == 0
    source = tmp_path / "pretrained.pt"
    shutil.copy(tmp_path / "base" / "ckpt_000001.pt", source)
    common = [*TINY, "--data", shards, "--init-from", str(source), "--checkpoint-every", "2", *CONSTANT_LR]
    assert run([*common, "--max-steps", "4", "--log-dir", str(tmp_path / "reference")]) == 0
    assert run([*common, "--max-steps", "2", "--log-dir", str(tmp_path / "ft")]) == 0
    source.unlink()  # the source is gone (a hub download evicted, a moved directory)
    code, out, err = run([*common, "--max-steps", "4", "--log-dir", str(tmp_path / "ft"), "--resume", "auto"], capsys)
    assert code == 0, err
    assert f"--init-from {source} is not read: the checkpoint holds every weight" in out
    assert_same_run(tmp_path / "reference", tmp_path / "ft")


# ---------------------------------------------------------------- --deterministic


def test_deterministic_is_accepted_and_changes_nothing_on_the_cpu(shards, tmp_path):
    common = [*TINY, "--data", shards, "--max-steps", "3"]
    assert run([*common, "--log-dir", str(tmp_path / "plain")]) == 0
    assert run([*common, "--deterministic", "--log-dir", str(tmp_path / "deterministic")]) == 0
    assert not torch.are_deterministic_algorithms_enabled()  # main puts the setting back
    assert records(tmp_path / "deterministic", "train_loss") == records(tmp_path / "plain", "train_loss")


def test_a_signal_before_the_first_step_of_a_run_resumed_from_elsewhere_checkpoints_in_its_log_dir(shards, tmp_path,
                                                                                                  start):
    """--resume PATH from another directory (a run moved to a new --log-dir): a SIGTERM in the evals of
    the first step, before any checkpoint is written in the new --log-dir, must leave one there, or the
    advised `--resume auto` would start again from step 0."""
    common = [*TINY, "--data", shards, "--eval-every", "2", "--val-tokens", "100000", *CONSTANT_LR]
    assert run([*common, "--max-steps", "2", "--log-dir", str(tmp_path / "old")]) == 0
    new = tmp_path / "new"
    program = start("moved", [*common, "--max-steps", "4", "--resume", str(tmp_path / "old" / "ckpt_000002.pt"),
                              "--log-dir", str(new)], pause_at="val_batch")
    program.pause()  # after the first val batch of step 2, the resumed run's first
    program.proc.send_signal(signal.SIGTERM)
    code, more = program.finish()
    assert code == 0 and more == 0, program.output()
    assert "stopped by a signal during the evals at step 2; continue with --resume auto" in program.output()
    assert [p.name for p in new.glob("ckpt_*.pt")] == ["ckpt_000002.pt"]
    assert run([*common, "--max-steps", "4", "--log-dir", str(new), "--resume", "auto"]) == 0
    assert run([*common, "--max-steps", "4", "--log-dir", str(tmp_path / "reference")]) == 0
    assert records(new, "train_loss") == pytest.approx({s: v for s, v in records(tmp_path / "reference",
                                                                              "train_loss").items() if s >= 2})


# ---------------------------------------------------------------- exactness after a hard kill, a new world size


def test_a_kill_9_just_before_a_checkpoint_resumes_to_the_uninterrupted_run(shards, tmp_path, start):
    """The OOM killer or a node failure: no handler runs. --resume auto goes back to the last complete
    checkpoint and the run continues exactly as if nothing had happened."""
    common = [*TINY, *CONSTANT_LR, "--data", shards, "--max-steps", "8", "--eval-every", "3", "--checkpoint-every", "2"]
    killed = start("killed", [*common, "--log-dir", str(tmp_path / "killed")], pause_at="checkpoint")
    killed.pause(nth=2)  # about to write ckpt_000004.pt
    killed.kill()
    # the dead run's .lock file stays, but its flock died with it: the resume takes it at once
    assert sorted(os.listdir(tmp_path / "killed")) == [".lock", "ckpt_000002.pt", "log.jsonl"]
    assert run([*common, "--log-dir", str(tmp_path / "killed"), "--resume", "auto"]) == 0
    assert run([*common, "--log-dir", str(tmp_path / "reference")]) == 0
    assert_same_run(tmp_path / "reference", tmp_path / "killed")


def test_a_resume_on_twice_the_ranks_with_the_same_total_batch_is_exact(shards, tmp_path):
    """A requeued job may get another number of GPUs: with the same --total-batch-size a step reads the
    same tokens, so 1 process x 4 micro-steps resumed as 2 gloo ranks x 2 equals the uninterrupted run."""
    common = [*TINY, "--data", shards, "--total-batch-size", "128", "--eval-every", "3"]
    assert run([*common, "--max-steps", "3", "--log-dir", str(tmp_path / "run")]) == 0
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               os.path.join(ROOT, "train_gpt2.py"), *common, "--max-steps", "6", "--resume", "auto",
                               "--log-dir", str(tmp_path / "run")],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert torchrun.returncode == 0, torchrun.stdout[-3000:] + torchrun.stderr[-3000:]
    assert "x 2 rank(s) x 2 accumulation step(s)" in torchrun.stdout
    assert run([*common, "--max-steps", "6", "--log-dir", str(tmp_path / "reference")]) == 0
    a, b = read_log(tmp_path / "reference"), read_log(tmp_path / "run")
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):  # 2 ranks sum their gradients in another order: float32 rounding, no more
        for key in ("train_loss", "val_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra, rb)
