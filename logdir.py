"""The run's directory, --log-dir, on disk: one run at a time (a lock), the checkpoints ckpt_NNNNNN.pt
(written whole or not at all, pruned to the newest few), and log.jsonl (the walkthrough's log.txt:
one JSON record per line, appended as the run goes; with --wandb-project the same records also go
to Weights & Biases). Rank 0 alone writes here.

train_gpt2.py decides what a checkpoint holds and when to write it; this file only keeps the files
safe: a crash, a kill -9, a full disk or a second run started by mistake never costs a good checkpoint.
"""
import contextlib
import fcntl
import json
import os
import re
import socket

import torch

from utils import atomic_write


class LogDirError(Exception):
    """--log-dir cannot be used (a file, not writable, in use by another run, a full disk): train_gpt2.py
    prints the message and exits with status 2."""


# rank 0's open --log-dir/.lock while it holds it (closing it releases it), and the directories it made
LOCK = {"fd": None, "path": None, "made": []}


def try_lock(log_dir):
    """Rank 0: flock log_dir/.lock, write "host H, pid P" in it, and keep it open in LOCK. Returns
    None, or who holds it. The kernel releases a flock when its process dies, however it dies (kill
    -9 too), so a lock is never stale. flock works across machines on NFS (v4, or v3 with lockd) and
    on Lustre mounted with -o flock; with NFS -o nolock or Lustre -o localflock it only sees runs on
    the same machine; where flock fails (Lustre with -o noflock) the run warns and goes on unlocked."""
    path = os.path.join(log_dir, ".lock")
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise LogDirError(f"--log-dir {log_dir} is a file, not a directory")
    made = missing_dirs(log_dir)
    while True:
        try:
            os.makedirs(log_dir, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LogDirError(f"--log-dir {log_dir}: cannot write there ({e.strerror}: {e.filename}); "
                             "give a directory this run can write to") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process holds it
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            return holder or "it has not written its host and pid yet"
        except OSError as e:  # ENOLCK, ENOSYS, EOPNOTSUPP: this filesystem has no flock
            os.close(fd)
            os.remove(path)
            print(f"warning: cannot lock --log-dir {log_dir} ({e.strerror}): this filesystem does not support "
                  "flock, so a second run in it at the same time would not be refused", flush=True)
            return None
        # unlock_log_dir removes the file before it releases the lock: if that happened between our
        # open and our flock, we locked a file that no longer has the name, so try again
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode())
    LOCK.update(fd=fd, path=path, made=made)
    return None


def missing_dirs(path):
    """The directories that os.makedirs(path) would make, deepest first."""
    path, missing = os.path.abspath(path), []
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def unlock_log_dir():
    """Remove the lock file, then release the lock by closing it (try_lock checks for this order).
    A run that stopped before writing anything (bad data, say) leaves no empty directory behind."""
    fd, path, made = LOCK["fd"], LOCK["path"], LOCK["made"]
    LOCK.update(fd=None, path=None, made=[])
    if fd is not None:
        with contextlib.suppress(OSError):  # already gone with its directory, say
            os.remove(path)
        os.close(fd)
        for directory in made:  # deepest first; one that is not empty stays, and so do its parents
            try:
                os.rmdir(directory)
            except OSError:
                break


def checkpoints(log_dir):
    """This script's checkpoints in log_dir (ckpt_NNNNNN.pt), oldest first; other files are ignored.
    os.listdir, not glob: a --log-dir like runs/exp[1] is a name, never a pattern."""
    names = os.listdir(log_dir) if os.path.isdir(log_dir) else []
    found = [os.path.join(log_dir, n) for n in names if re.fullmatch(r"ckpt_\d{6,}\.pt", n)]  # not ckpt_best.pt
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path):
    return int(os.path.basename(path)[len("ckpt_"):-len(".pt")])


def newest_checkpoint(log_dir):
    """Words for an error message: which checkpoint a run that stops now leaves as the newest."""
    found = checkpoints(log_dir)
    return f"the newest one, {found[-1]}, is still good" if found else f"none was written in {log_dir} yet"


def storage_bytes(obj, seen=None):
    """Bytes of the tensor storages in a nested dict/list, each shared storage once (the tied
    wte/lm_head weight): about the size torch.save writes."""
    seen = {} if seen is None else seen
    if isinstance(obj, torch.Tensor):
        seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    elif isinstance(obj, dict):
        for v in obj.values():
            storage_bytes(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            storage_bytes(v, seen)
    return sum(seen.values())


def save(path, ckpt, keep):
    """Write the checkpoint dict to path, then prune the directory to the newest `keep` checkpoints.
    A full disk raises OSError naming the directory and the space needed; the partial file is removed
    and the older checkpoints are untouched (pruning comes only after a complete write)."""
    atomic_write(path, lambda f: torch.save(ckpt, f), size_hint=storage_bytes(ckpt))  # whole, or not at all
    for old in checkpoints(os.path.dirname(path) or ".")[:-keep]:
        os.remove(old)


def remove_partial_checkpoints(log_dir):
    """Remove what a save killed mid-write left (ckpt_NNNNNN.pt.tmp): it may be what filled the disk."""
    for name in os.listdir(log_dir):
        if re.fullmatch(r"ckpt_\d{6,}\.pt\.tmp", name):
            os.remove(os.path.join(log_dir, name))


def keep_earlier_log(path):
    """A fresh run finds a log.jsonl (its checkpoints were moved away, or it died before the first):
    rename it to log.jsonl.N, the first free N, and say so."""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        n = 1
        while os.path.exists(f"{path}.{n}"):
            n += 1
        os.rename(path, f"{path}.{n}")
        print(f"{path} of an earlier run is kept as {path}.{n}; this run starts a new one", flush=True)


def trim_log(path, start_step):
    """log.jsonl is an append log (the walkthrough's log.txt, one JSON record per line); a run starting
    at step k keeps the records of earlier steps only. A last line cut short by a crash is dropped;
    other lines that are not records (a corrupted disk block) are moved to log.jsonl.bad, with a warning."""
    lines = open(path, "rb").readlines() if os.path.exists(path) else []
    kept, bad = [], []
    for n, line in enumerate(lines, 1):
        step = record_step(line)
        if step is None and line.endswith(b"\n"):
            bad.append(line)
            print(f"warning: {path} line {n} is not a log record: moved to {path}.bad", flush=True)
        elif step is not None and step < start_step:
            kept.append(line)
    if bad:
        with open(path + ".bad", "ab") as f:
            f.write(b"".join(bad))
    atomic_write(path, lambda f: f.write(b"".join(kept)))


def record_step(line):
    """The step of a complete log line, or None if it is not a record (or was cut short)."""
    try:
        record = json.loads(line)
    except ValueError:  # also a UnicodeDecodeError
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) and line.endswith(b"\n") else None


def append_log(path, **record):
    """Rank 0 appends one record; the other ranks pass path None."""
    if path is None:
        return
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise LogDirError(f"{path}: cannot append to the log ({e.strerror}); the checkpoints are intact") from e


def log(log_path, step, **values):
    """One record of the run: appended to log.jsonl (the source of truth, which play.ipynb plots) and,
    with --wandb-project, added to the step's wandb row. Rank 0 logs; the others pass log_path None."""
    append_log(log_path, step=step, **values)
    add_to_wandb_row(step, values)


# ---------------------------------------------------------------- Weights & Biases (--wandb-project)
# Optional: wandb is imported only when asked for. Rank 0 sends every log.jsonl record, the samples,
# and the run's config; a checkpoint stores the run's id, so a resumed run continues the same curves.

WANDB = {"run": None, "row": {}, "first_step": 0}  # rank 0's wandb run; the current step's values so far


def start_wandb(project, run_name, config, run_id=None):
    """Rank 0 with --wandb-project: start a wandb run, or continue the checkpoint's run_id."""
    import wandb  # train_gpt2.parse_args checked that it is installed

    try:
        run = wandb.init(project=project, name=run_name, id=run_id, resume="allow", config=config)
    except Exception as e:  # not logged in, no network, ...: wandb has many error types
        raise LogDirError(f"--wandb-project {project}: wandb did not start ({type(e).__name__}: {e}); "
                          "run `wandb login`, or set WANDB_MODE=offline (and `wandb sync` later)") from e
    # A resumed wandb run goes on after the last step it holds (online; offline it starts at 0, and
    # `wandb sync` uploads the pieces in order). Steps that a crash made this run redo (those after
    # its checkpoint) are already there: wandb would refuse each one with a warning; skip them.
    WANDB.update(run=run, row={}, first_step=run.starting_step)


def add_to_wandb_row(step, values):
    """A step's values go to wandb as one row (wandb's step = ours), sent when the next step's first
    value comes or the run ends: a step whose evals a signal cuts short is redone by the resumed run,
    so its partial row is dropped (drop_wandb_row), as trim_log drops its records from log.jsonl."""
    if WANDB["run"] is None:
        return
    if WANDB["row"] and WANDB["row"]["step"] != step:
        send_wandb_row()
    WANDB["row"].update(step=step, **{k: v for k, v in values.items() if v is not None})  # mfu: None on CPU


def send_wandb_row():
    row, WANDB["row"] = WANDB["row"], {}
    if row and row["step"] >= WANDB["first_step"]:
        WANDB["run"].log({k: v for k, v in row.items() if k != "step"}, step=row["step"], commit=True)


def drop_wandb_row(step):
    """Forget what `step` logged so far (its evals, cut short by a signal: the resumed run redoes
    them). The row of an earlier step, not sent yet because `step` logged nothing, stays."""
    if WANDB["row"].get("step") == step:
        WANDB["row"] = {}


def log_samples_to_wandb(step, samples):
    """Rank 0's samples, as a table in the step's wandb row."""
    if WANDB["run"] is not None:
        import wandb

        add_to_wandb_row(step, {"samples": wandb.Table(columns=["sample"], data=[[text] for text in samples])})


def finish_wandb(exit_code):
    """Send the last row and close the run (exit_code != 0 marks it failed in wandb)."""
    if WANDB["run"] is not None:
        try:
            send_wandb_row()
            WANDB["run"].finish(exit_code=exit_code)
        except Exception as e:  # the run's outcome is decided and in log.jsonl: only say so
            print(f"warning: wandb did not finish ({type(e).__name__}: {e}); log.jsonl has every record", flush=True)
        WANDB.update(run=None, row={}, first_step=0)
