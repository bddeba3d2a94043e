"""Train GPT-2 (124M) from scratch on FineWeb-edu with GPT-3's recipe, on one device or many.

    python fineweb.py                                        # once: FineWeb-edu -> edu_fineweb10B/ shards
    torchrun --standalone --nproc_per_node=8 train_gpt2.py   # 8 GPUs: 19,073 steps of 524,288 tokens = 10B
    python train_gpt2.py                                     # the same run on one device
    python train_gpt2.py --preset shakespeare                # a first run: tiny model, Tiny Shakespeare, any CPU
    python train_gpt2.py --resume auto                       # continue from the newest checkpoint in --log-dir
    python train_gpt2.py --eval-only --init-from gpt2        # val loss and HellaSwag of a model, no training

The recipe (GPT-3 paper, table 2.1, "Small"): AdamW(0.9, 0.95, eps 1e-8), weight decay 0.1 on
matrices only, gradients clipped to norm 1.0, 0.5M-token batches, learning rate 6e-4 warmed up
linearly over 715 steps, then a cosine down to 10% at step 19,073. Each optimizer step sees
--total-batch-size tokens: every rank runs grad_accum_steps micro-batches of --batch-size x --seq-len
tokens, and DDP averages the gradients across ranks once per step. Every --eval-every steps: val
loss and HellaSwag accuracy; every --sample-every steps: a few samples. A checkpoint holds everything
needed to continue exactly where the run stopped; SIGTERM or Ctrl-C finishes the current step (or
eval batch) and writes one.
One run at a time uses a --log-dir: it holds a lock on it from start to exit. log.jsonl there is the
run's record; with --wandb-project, Weights & Biases gets the same records too.

Reading order: top to bottom as far as train() and eval_only(): get_lr (the schedule), then the data
(dataloader.py), train_step and val_loss (one step, one eval), train() (the run). The plumbing follows:
distributed helpers, checkpoints and the log (logdir.py keeps the files safe), then the command line.
model.py holds the GPT itself.
"""
import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import math
import os
import random
import shlex
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import logdir
import utils
import weights
from dataloader import DataError, DataLoader, data_sources
from logdir import LogDirError, checkpoint_step, checkpoints, newest_checkpoint
from model import GPT, H100_BF16_PEAK_FLOPS, OPENAI_SIZES, config_for
from utils import pause_point


class TrainError(Exception):
    """Bad input (a flag, a checkpoint) or a run that cannot go on (a full disk): main prints the
    message and exits with status 2."""


class Diverged(Exception):
    """The loss, the gradient norm or the weights became inf or NaN: main prints the message and
    exits with status 1, and no checkpoint of the bad state is written."""


# ---------------------------------------------------------------- learning rate


def get_lr(step, args):
    """Linear warmup to --lr over --warmup-steps, then a cosine down to lr * min_lr_ratio at --max-steps."""
    max_lr, min_lr = args.lr, args.lr * args.min_lr_ratio
    if step < args.warmup_steps:
        return max_lr * (step + 1) / args.warmup_steps  # step 0 already learns a little
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)  # cosine: 1 -> 0


# ---------------------------------------------------------------- data
# dataloader.py: data_sources(--data) lists the train and val shards; DataLoader turns them into
# (x, y) micro-batches, each rank its own slice of every optimizer step's tokens.


# ---------------------------------------------------------------- model, training step, evaluation


def requested_config(args):
    """The GPTConfig that the shape flags ask for (--model, --n-layer, --n-head, --n-embd, --seq-len)."""
    shape = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd") if getattr(args, k)}
    return config_for(args.model, block_size=args.seq_len, padded_vocab_size=args.padded_vocab_size, **shape)


def build_model(args, device, resume_config=None):
    """A new GPT of the requested shape (seeded by the caller), or pretrained weights with --init-from.
    To resume, resume_config (the checkpoint's GPTConfig) gives the shape and the checkpoint the
    weights: a fine-tune resumes without its --init-from source (a hub download, a moved directory)."""
    try:
        if resume_config is not None:
            model = GPT(resume_config)
        elif args.init_from:
            model = GPT.from_pretrained(args.init_from, padded_vocab_size=args.padded_vocab_size)
        else:
            model = GPT(requested_config(args))
    except (ValueError, OSError) as e:
        raise TrainError(f"{'--init-from ' + args.init_from if args.init_from else 'model shape'}: {e}") from e
    if args.seq_len > model.config.block_size:
        raise TrainError(f"--seq-len {args.seq_len} is longer than the model's block size {model.config.block_size}")
    return model.to(device)


def autocast(device, dtype):
    """Matmuls in dtype (bfloat16), weights and reductions in float32; dtype None = plain float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_step(model, optimizer, loader, grad_accum_steps, lr, grad_clip=1.0, autocast_dtype=None):
    """One optimizer step over grad_accum_steps micro-batches from loader. Returns (mean loss over all
    micro-steps and ranks, gradient norm) as device tensors: nothing here waits for the device, so the
    host keeps queueing work ahead of it (the caller reads the two numbers once, to log them)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_accum = 0.0
    for micro_step in range(grad_accum_steps):
        x, y = loader.next_batch()
        # DDP all-reduces gradients after every backward; only the step's last one needs it (the
        # walkthrough sets model.require_backward_grad_sync; no_sync() is the public way)
        sync = micro_step == grad_accum_steps - 1 or not isinstance(model, DDP)
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast(x.device, autocast_dtype):
                _, loss = model(x, y, return_logits=False)
            loss = loss / grad_accum_steps  # the summed gradients are then those of the mean loss
            loss.backward()
        loss_accum = loss_accum + loss.detach()
    if dist.is_initialized():  # log the mean over all ranks, not only this rank's (gloo has no AVG)
        dist.all_reduce(loss_accum)
        loss_accum = loss_accum / dist.get_world_size()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    # DDP's gradient_as_bucket_view: the grads are views into its all-reduce buckets, so zero them in place
    # (set to None, the no_sync micro-steps would allocate fresh gradients beside the buckets)
    optimizer.zero_grad(set_to_none=not isinstance(model, DDP))
    return loss_accum, norm


@torch.no_grad()
def val_loss(model, loader, steps, autocast_dtype=None, should_stop=lambda: False):
    """Mean loss over the first `steps` val batches: the same tokens at every eval, split across ranks.
    None if should_stop() (a SIGTERM) turns true between batches: the rest is skipped. Each rank looks
    at its own flag, which then travels in the one all-reduce with the loss (never a collective that
    another rank skips), so every rank returns None together."""
    loader.reset()
    total, stopped = torch.zeros((), device=loader.device), False
    for _ in range(steps):
        if should_stop():
            stopped = True
            break
        x, y = loader.next_batch()
        with autocast(x.device, autocast_dtype):
            total += model(x, y, return_logits=False)[1].float()
        pause_point("val_batch")  # tests signal here, after a batch
    total_and_stopped = torch.stack([total, torch.tensor(float(stopped), device=total.device)])
    if dist.is_initialized():
        dist.all_reduce(total_and_stopped)  # the sum over ranks of both
    total, stopped = total_and_stopped.tolist()
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return None if stopped else total / world_size / steps


def print_samples(model, args, device, rank, autocast_dtype=None, should_stop=lambda: False):
    """Print --num-samples continuations of --sample-prompt and return their texts; None (having
    printed nothing) if should_stop() turned true between tokens."""
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    prompt = torch.tensor([enc.encode_ordinary(args.sample_prompt)] * args.num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed + rank)  # each rank its own samples
    tokens = [prompt]
    with autocast(device, autocast_dtype):
        for next_id in model.generate_stream(prompt, args.sample_tokens, top_k=50, generator=generator):
            tokens.append(next_id)
            pause_point("sample_token")  # tests signal here, after a token
            if should_stop():
                return None
    texts = [enc.decode(row) for row in torch.cat(tokens, dim=1).tolist()]
    for i, text in enumerate(texts):
        print(f"rank {rank} sample {i}: {text}", flush=True)
    return texts


def load_hellaswag(args, block_size):
    """HellaSwag val examples, or None (after one line saying why) when off or unavailable. Rank 0
    calls this (downloading once); on_rank0 sends the examples to the other ranks."""
    if not args.hellaswag:
        return None
    import hellaswag

    try:
        return hellaswag.load_examples("val", data_file=args.hellaswag_file, block_size=block_size)
    except hellaswag.HellaSwagUnavailable as e:
        print(f"hellaswag: skipped ({e}; in train_gpt2.py that is --hellaswag-file)", flush=True)
        return None
    except (OSError, ValueError) as e:
        raise TrainError(f"HellaSwag data: {e} (pass --hellaswag-file FILE or --no-hellaswag)") from e


def run_evals(step, args, compiled, raw_model, val_loader, val_steps, hellaswag_examples, autocast_dtype,
              log_path):
    """The evals due at `step` (val loss, HellaSwag, samples), each logged as it completes. False if
    a signal came meanwhile: the rest is skipped on every rank, and nothing partial is logged (the
    resumed run redoes this step's evals; trim_log drops what this one logged)."""
    last_step = step == args.max_steps
    eval_due = last_step or (args.eval_every and step % args.eval_every == 0)
    sample_step = last_step or (args.sample_every and step % args.sample_every == 0)
    samples_due = step > 0 and args.num_samples and sample_step
    if not (eval_due or samples_due):
        return True
    device = val_loader.device
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if eval_due:
        loss = val_loss(compiled, val_loader, val_steps, autocast_dtype, should_stop=signalled)
        if loss is None:
            return False
        print0(f"step {step:5d} | val loss {loss:.4f}")
        log(log_path, step, val_loss=loss)
        if hellaswag_examples:
            import hellaswag

            pause_point("hellaswag")  # tests signal here
            result = hellaswag.evaluate(raw_model, hellaswag_examples, device, rank=rank, world_size=world_size,
                                        autocast_dtype=autocast_dtype, should_stop=signalled)
            if result is None:  # a signal came: checked before every HellaSwag batch
                return False
            print0(f"step {step:5d} | hellaswag acc_norm {result['acc_norm']:.4f} "
                   f"({result['correct_norm']}/{result['n']})")
            log(log_path, step, hellaswag=result["acc_norm"])
    if samples_due:
        samples = print_samples(raw_model, args, device, rank, autocast_dtype, should_stop=signalled)
        if samples:
            logdir.log_samples_to_wandb(step, samples)
    return not stop_requested(device)  # every rank here: all of them agree


# ---------------------------------------------------------------- the run


def start_run(args):
    """What every run does first (training or --eval-only): the processes and the device, the autocast
    dtype, and the --log-dir lock. (rank, world_size, device, autocast_dtype), or None if a signal came
    while waiting for the lock."""
    if args.deterministic:  # before any CUDA work: cuBLAS reads its workspace setting when it starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    rank, world_size, device = setup_distributed(args.device)
    autocast_dtype = utils.autocast_dtype(device.type, args.dtype)  # auto: bf16 on CUDA and on CPUs that have it
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the matmuls autocast leaves in float32
    if not lock_log_dir(args, device):  # before anything in --log-dir is read; held until main returns
        print0(f"stopped by a signal while waiting for --log-dir {args.log_dir}; nothing was done")
        return None
    return rank, world_size, device, autocast_dtype


def train(args):
    started = start_run(args)
    if started is None:
        return 0
    rank, world_size, device, autocast_dtype = started
    master_process = rank == 0  # rank 0 prints, logs and writes checkpoints
    use_compile = device.type == "cuda" if args.compile is None else args.compile

    B, T = args.batch_size, args.seq_len
    grad_accum_steps = check_batch_layout(args, world_size)
    ckpt_path, ckpt = checkpoint_to_resume(args, device)  # (None, None): a fresh run
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw_model = build_model(args, device, ckpt["config"] if ckpt else None)
    config = raw_model.config
    train_shards, val_shards = data_sources(args.data)
    train_loader = DataLoader(train_shards, B, T, rank, world_size, grad_accum_steps, shuffle=True, seed=args.seed,
                              vocab_size=config.vocab_size, device=device)
    val_loader = DataLoader(val_shards, B, T, rank, world_size, 1, shuffle=False, vocab_size=config.vocab_size,
                            device=device)
    val_steps = check_val_steps(args, world_size, val_loader.num_tokens)
    optimizer = raw_model.configure_optimizers(args.weight_decay, args.lr, device.type, verbose=master_process)
    start_step, wandb_id = 0, None
    if ckpt:
        start_step = load_checkpoint(ckpt_path, ckpt, raw_model, optimizer, train_loader)
        wandb_id = ckpt.get("wandb_id")  # its wandb run, if it had one, goes on
        print0(f"resumed from {ckpt_path} at step {start_step}")
        del ckpt  # the weights now live in the model: free the copy

    # The training step runs the compiled model, wrapped in DDP. Val loss reuses the compiled model
    # (same shapes, so one extra graph for no_grad, no recompilation). Sampling and HellaSwag feed
    # ever-changing shapes (prompt lengths, KV cache): compiled, they would recompile again and again,
    # so they run raw_model, the plain module, which shares the very same weight tensors.
    compiled = torch.compile(raw_model) if use_compile else raw_model
    model = compiled
    if world_size > 1:  # DDP averages the gradients across ranks during backward
        # gradient_as_bucket_view: .grad tensors are views into DDP's all-reduce buckets (one copy less)
        model = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
    hellaswag_examples = on_rank0(lambda: load_hellaswag(args, config.block_size))

    print0(f"model: {raw_model.num_params():,} parameters (n_layer {config.n_layer}, n_head {config.n_head}, n_embd "
           f"{config.n_embd}, block {config.block_size}, vocab {config.vocab_size} padded to "
           f"{config.padded_vocab_size})")
    print0(f"data: {args.data}: {len(train_shards)} train shard(s), {train_loader.num_tokens:,} tokens; "
           f"val loss on {val_steps * B * T * world_size:,} tokens")
    print0(f"batch: {B} x {T} = {B * T:,} tokens per micro-step x {world_size} rank(s) x {grad_accum_steps} "
           f"accumulation step(s) = {args.total_batch_size:,} tokens per step; {args.max_steps:,} steps = "
           f"{args.max_steps * args.total_batch_size:,} tokens")
    print0(f"device: {device}, autocast {autocast_dtype or 'off (float32)'}, compile {'on' if use_compile else 'off'}")

    on_rank0(lambda: start_wandb(args, raw_model, world_size, wandb_id))
    log_path = on_rank0(lambda: prepare_log_dir(args, start_step))
    log_path = log_path if master_process else None  # rank 0 alone logs
    print0(f"log: {os.path.join(args.log_dir, 'log.jsonl')} (every step); checkpoints: {args.log_dir}")
    dt_avg, started_at = None, time.perf_counter()
    for step in range(start_step, args.max_steps + 1):
        if not run_evals(step, args, compiled, raw_model, val_loader, val_steps, hellaswag_examples,
                         autocast_dtype, log_path):  # a signal came during them
            logdir.drop_wandb_row(step)  # the resumed run redoes this step's evals
            # the steps done since the last checkpoint are not lost: --resume auto finds them in --log-dir
            # (a run resumed from a checkpoint elsewhere, with --resume PATH, has none there yet)
            if step > 0 and not on_rank0(lambda: os.path.exists(checkpoint_path(args, step))):
                write_checkpoint(args, step, raw_model, optimizer, train_loader)
            if STOP["error"]:
                raise STOP["error"]
            print0(f"stopped by a signal during the evals at step {step}; continue with --resume auto")
            return 0
        if step == args.max_steps:
            break

        t0 = time.perf_counter()
        lr = get_lr(step, args)
        loss, norm = train_step(model, optimizer, train_loader, grad_accum_steps, lr, args.grad_clip, autocast_dtype)
        # the step's one wait for the device; the stop flag rides along (every rank stops after the same step)
        loss, norm, stop = torch.stack([loss.float(), norm.float(), stop_flag(device)]).tolist()
        dt = time.perf_counter() - t0
        check_finite(step, loss, norm, args.log_dir)
        dt_avg = dt if dt_avg is None or step == start_step + 1 else 0.9 * dt_avg + 0.1 * dt  # skip compile
        tok_per_s = args.total_batch_size / dt
        mfu = None if device.type != "cuda" else raw_model.estimate_mfu(tok_per_s / world_size, T,
                                                                        args.peak_tflops * 1e12)
        eta = datetime.timedelta(seconds=round((args.max_steps - step - 1) * dt_avg))
        if step % args.print_every == 0 or step + 1 == args.max_steps:  # log.jsonl gets every step
            print0(f"step {step:5d}/{args.max_steps} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | "
                   f"{dt * 1000:.1f} ms | {tok_per_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu is not None else "")
                   + f" | ETA {eta}")
        log(log_path, step, train_loss=loss, lr=lr, norm=norm, dt_ms=dt * 1000, tok_per_s=tok_per_s, mfu=mfu)
        done = step + 1
        if stop or done == args.max_steps or (args.checkpoint_every and done % args.checkpoint_every == 0):
            write_checkpoint(args, done, raw_model, optimizer, train_loader)
        if stop:
            if STOP["error"]:
                raise STOP["error"]
            print0(f"stopped by a signal after step {step}; continue with --resume auto")
            return 0
    took = datetime.timedelta(seconds=round(time.perf_counter() - started_at))
    final = checkpoint_path(args, args.max_steps) if start_step < args.max_steps else ckpt_path  # resumed at the end
    sample = shlex.join(["python", "sample.py", "-m", final, f"--prompt={args.sample_prompt}"])
    print0(f"done at step {args.max_steps:,} after {took}. Sample from the model with: {sample}")
    return 0


def eval_only(args):
    """--eval-only: the val loss of --init-from MODEL on the tokens of training's evals (the first
    --val-tokens of the val data, in whole B x T x world batches) and its HellaSwag accuracy, printed
    and appended to --log-dir's log.jsonl as one record, at the step of a train_gpt2.py checkpoint (0
    for other models). No training: no optimizer, no train data read, no checkpoint written."""
    started = start_run(args)
    if started is None:
        return 0
    rank, world_size, device, autocast_dtype = started
    model = build_model(args, device)
    val_shards = data_sources(args.data, need_train=False)[1]
    val_loader = DataLoader(val_shards, args.batch_size, args.seq_len, rank, world_size, 1,
                            shuffle=False, vocab_size=model.config.vocab_size, device=device)
    val_steps = check_val_steps(args, world_size, val_loader.num_tokens)
    hellaswag_examples = on_rank0(lambda: load_hellaswag(args, model.config.block_size))
    is_checkpoint = os.path.isfile(args.init_from)  # its step places the record on the run's curves
    step = weights.read_checkpoint(args.init_from, keys=(), mmap=True).get("step", 0) if is_checkpoint else 0
    print0(f"eval-only: {args.init_from} ({model.num_params():,} parameters, step {step}); val loss on "
           f"{val_steps * args.batch_size * args.seq_len * world_size:,} tokens of {args.data}")
    on_rank0(lambda: start_wandb(args, model, world_size))
    loss, result = val_loss(model, val_loader, val_steps, autocast_dtype, should_stop=signalled), None
    if loss is not None and hellaswag_examples:
        import hellaswag

        result = hellaswag.evaluate(model, hellaswag_examples, device, rank=rank, world_size=world_size,
                                    autocast_dtype=autocast_dtype, should_stop=signalled)
    if loss is None or (hellaswag_examples and result is None):
        print0("stopped by a signal before the evals finished: nothing was logged")
        return 1
    record = dict(val_loss=loss)
    print0(f"val loss {loss:.6f}")
    if result:
        print0(f"hellaswag acc_norm {result['acc_norm']:.4f} ({result['correct_norm']}/{result['n']})")
        record["hellaswag"] = result["acc_norm"]
    logdir.log(os.path.join(args.log_dir, "log.jsonl") if rank == 0 else None, step, **record, eval_only=True,
        model=args.init_from)
    return 0


# ---------------------------------------------------------------- distributed helpers


def setup_distributed(device_arg):
    """(rank, world_size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this
    is a single process. NCCL links CUDA devices; gloo lets CPUs (and tests) run DDP too."""
    env = {k: int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1))}
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = check_device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", env["LOCAL_RANK"] if device.index is None else device.index)
        if device.index >= torch.cuda.device_count():
            raise TrainError(f"--device {device_arg}: cuda:{device.index} does not exist, this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        # rank 0 alone writes checkpoints while the others wait in a collective: NCCL's default 10-minute
        # timeout would end the job at every save of a big model on a slow shared filesystem
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return env["RANK"], env["WORLD_SIZE"], device


def check_device(name):
    """torch.device(name) if this machine has it; else a TrainError saying what it has."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise TrainError(f"--device {name}: not a device ({e.args[0].splitlines()[0]}); use auto, cpu, cuda, "
                         "cuda:N or mps") from e
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device.type not in available:
        raise TrainError(f"--device {name}: not supported here; use auto, cpu, cuda, cuda:N or mps")
    if not available[device.type]:
        raise TrainError(f"--device {name}: no {device.type.upper()} device is available on this machine "
                         "(try --device cpu)")
    return device


def print0(*args, **kwargs):
    """print on rank 0 only (torchrun sets RANK), so that 8 GPUs print one line, not 8."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def on_rank0(fn):
    """fn() run by rank 0 alone, and its result, or the error it raised (as a TrainError), given to
    every rank: so all ranks take the same branch, and none waits in a collective that another one
    skipped (also when each node has its own disk, and only rank 0's has the file)."""
    result, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn()
        except (TrainError, DataError) as e:
            error = str(e)
        except Exception as e:  # anything else too: the other ranks must not wait for a broadcast
            if not dist.is_initialized():
                raise
            error = f"on rank 0: {type(e).__name__}: {e}"
    if dist.is_initialized():
        box = [result, error]
        dist.broadcast_object_list(box, src=0)
        result, error = box
    if error:
        raise TrainError(error)
    return result


# set by a SIGTERM/SIGINT handler (or a log rank 0 cannot write); the run stops after the step or eval batch
STOP = {"signal": None, "error": None}


def request_stop(signum, frame):
    # Only a flag: a scheduler may signal torchrun and every worker at once, and torchrun passes its
    # signal on too, so one preemption can arrive twice; each must still end in a checkpoint.
    STOP["signal"] = signum


def signalled():
    """Whether this rank got SIGTERM/SIGINT (or rank 0 could not log). Local: to act on it, ranks first
    agree (stop_flag)."""
    return STOP["signal"] is not None or STOP["error"] is not None


def log(log_path, step, **values):
    """logdir.log. A log that rank 0 cannot append to (a lost mount, a full disk) stops the run as a
    signal does, on every rank (the stop flag) and after a checkpoint if one can be written; then the
    run ends with that error. Raised on rank 0 alone, it would leave the others in their next collective."""
    try:
        logdir.log(log_path, step, **values)
    except LogDirError as e:
        STOP["error"] = e


def stop_flag(device):
    """1.0 on every rank if any rank was signalled, else 0.0: a device tensor (nothing waits for it
    here), made by a collective, so all ranks call it at the same point and take the same branch."""
    stop = torch.full((), float(signalled()), device=device)
    if dist.is_initialized():  # a signal to any one rank stops them all
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    return stop


def stop_requested(device):
    return bool(stop_flag(device).item())


# ---------------------------------------------------------------- checkpoints and log
# What a checkpoint holds and when one is written or resumed. logdir.py keeps the files themselves
# safe (the lock, atomic writes, pruning, log.jsonl); rank 0 alone writes to --log-dir.


def lock_log_dir(args, device):
    """Rank 0 takes an exclusive lock on --log-dir for the whole run: a second run in the same
    directory (say a requeued job that starts while the preempted one still writes its SIGTERM
    checkpoint) would remove its partial file, prune its checkpoints and interleave its log. That
    run is refused, or with --wait-for-lock waits until the first one exits. Every rank waits
    together (rank 0 looks once a second and tells the others). False if a signal came while waiting."""
    waiting = False
    while True:
        holder = on_rank0(lambda: logdir.try_lock(args.log_dir))  # None: locked
        if holder is None:
            return True
        if not args.wait_for_lock:
            raise TrainError(f"--log-dir {args.log_dir} is in use by another run ({holder}): wait until it "
                             "ends, pass --wait-for-lock to wait for it, or use another --log-dir")
        if not waiting:
            print0(f"--log-dir {args.log_dir} is in use by another run ({holder}): waiting until it ends "
                   "(--wait-for-lock)")
            waiting = True
        if stop_requested(device):
            return False
        time.sleep(1)


def checkpoint_path(args, step):
    return os.path.join(args.log_dir, f"ckpt_{step:06d}.pt")


def write_checkpoint_file(args, step, raw_model, optimizer, loader):
    """Rank 0: write ckpt_{step}.pt, then prune to the newest --keep-checkpoints. A full disk is a
    TrainError naming the directory and the space needed; the partial file is removed and the
    older checkpoints are untouched (pruning comes after a complete write)."""
    ckpt = dict(model=raw_model.state_dict(), config=dataclasses.asdict(raw_model.config),
                optimizer=optimizer.state_dict(), step=step, loader=loader.state_dict(), args=vars(args),
                rng=dict(torch=torch.get_rng_state(), python=random.getstate(),
                         cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []))
    if logdir.WANDB["run"] is not None:  # a resume continues this wandb run
        ckpt["wandb_id"] = logdir.WANDB["run"].id
    path = checkpoint_path(args, step)
    pause_point("checkpoint")  # tests act here, just before the write
    try:
        logdir.save(path, ckpt, keep=args.keep_checkpoints)
    except OSError as e:
        raise TrainError(f"checkpoint at step {step}: {e}") from e
    return path


def check_finite(step, loss, norm, log_dir):
    """Diverged if a step's loss or gradient norm is inf or NaN (every rank sees the same numbers):
    the run stops before it can write a checkpoint of the bad state."""
    if not (math.isfinite(loss) and math.isfinite(norm)):
        newest = on_rank0(lambda: newest_checkpoint(log_dir))
        raise Diverged(f"step {step}: loss {loss}, gradient norm {norm}. Stopping without writing a checkpoint "
                       f"({newest}); try a lower --lr")


def weights_finite(model):
    """Whether every parameter is finite: one fused check, one wait for the device (at saves only)."""
    return bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all())


def write_checkpoint(args, step, raw_model, optimizer, loader):
    """The checkpoint after `step` completed steps, if the weights are finite (the loss and gradient
    norm were, but the update may not be): rank 0 writes it, every rank waits and sees its errors.
    Every rank checks the weights (identical on all of them), so all raise Diverged together."""
    if not weights_finite(raw_model):
        newest = on_rank0(lambda: newest_checkpoint(args.log_dir))
        raise Diverged(f"step {step - 1}: the update made the weights inf or NaN (its loss and gradient norm were "
                       f"finite). Stopping without writing a checkpoint ({newest}); try a lower --lr")
    path = on_rank0(lambda: write_checkpoint_file(args, step, raw_model, optimizer, loader))
    print0(f"checkpoint: {path}")


def find_checkpoint(args):
    """The checkpoint to resume from, or None for a fresh run; refuses what would mix two runs in
    --log-dir: a fresh run beside old checkpoints, or a resume from a step older than some of them
    (pruning and a later --resume auto would then pick up the abandoned run's files)."""
    found = checkpoints(args.log_dir)
    if args.resume is None:
        if found:
            raise TrainError(f"--log-dir {args.log_dir} holds checkpoints of an earlier run (newest: {found[-1]}): "
                             "continue it with --resume auto, or use another --log-dir")
        return None
    if args.resume == "auto":
        if not found:
            print(f"no checkpoint in {args.log_dir}: starting from step 0", flush=True)
        return found[-1] if found else None
    if not os.path.isfile(args.resume):
        raise TrainError(f"--resume {args.resume}: no such file (give a checkpoint file, or 'auto')")
    step = read_checkpoint(args.resume, mmap=True)["step"]  # memory-mapped: the step, not the weights
    later = [f for f in found if checkpoint_step(f) > step]
    if later:
        raise TrainError(f"--resume {args.resume} continues from step {step}, but --log-dir {args.log_dir} holds "
                         f"later checkpoints ({', '.join(map(os.path.basename, later))}) of the run it leaves: "
                         "move them away, or use another --log-dir")
    return args.resume


def read_checkpoint(path, mmap=False):
    try:
        ckpt = weights.read_checkpoint(path, keys=("model", "config", "step", "optimizer", "loader", "rng"),
                                       mmap=mmap)
    except ValueError as e:
        raise TrainError(f"--resume {e}") from e
    if isinstance(ckpt["step"], bool) or not isinstance(ckpt["step"], int) or ckpt["step"] < 0:
        raise TrainError(f"--resume {path}: not a train_gpt2.py checkpoint (step {ckpt['step']!r})")
    return ckpt


def checkpoint_to_resume(args, device):
    """(path, checkpoint dict) to resume from, or (None, None) for a fresh run. Rank 0 finds it,
    every rank reads it. Refused before anything is written: a checkpoint past --max-steps, a model
    shape other than the flags ask for (unless --init-from: then the checkpoint's shape is the run's)."""
    path = on_rank0(lambda: find_checkpoint(args))  # rank 0 writes --log-dir: it decides
    if not path:
        return None, None
    if dist.is_initialized():  # every rank reads the checkpoint rank 0 found
        seen = torch.tensor(float(os.path.isfile(path)), device=device)
        dist.all_reduce(seen, op=dist.ReduceOp.MIN)
        if not seen.item():
            raise TrainError(f"{path}: rank 0 resumes from it, but not every rank can read it; with several "
                             "nodes, --log-dir must be on a filesystem that all of them share")
    ckpt = read_checkpoint(path)
    if ckpt["step"] > args.max_steps:
        raise TrainError(f"--max-steps {args.max_steps} is below the step of the checkpoint to resume, {path} "
                         f"(step {ckpt['step']}): nothing to do. Pass --max-steps {ckpt['step']} or more (nothing "
                         "was changed)")
    try:
        ckpt["config"] = weights.config_from_dict(ckpt["config"], path)
    except ValueError as e:
        raise TrainError(f"--resume {e}") from e
    if args.init_from:
        print0(f"--init-from {args.init_from} is not read: the checkpoint holds every weight")
        return path, ckpt
    try:
        want = requested_config(args)
    except ValueError as e:
        raise TrainError(f"model shape: {e}") from e
    if ckpt["config"] != want:
        shape = lambda c: ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(c).items())  # noqa: E731
        raise TrainError(f"--resume {path}: the checkpoint holds a model with {shape(ckpt['config'])}, but this run "
                         f"asks for {shape(want)}. Pass the same shape flags, or use another --log-dir")
    return path, ckpt


def load_checkpoint(path, ckpt, raw_model, optimizer, loader):
    """Restore everything a checkpoint holds into a model of its shape; returns the steps it had completed."""
    try:
        raw_model.load_state_dict(ckpt["model"])
        # the checkpoint gives the optimizer's state (moments, step counts); this run's flags give its
        # settings: load_state_dict alone would bring back the old weight decay, and fused=False from a CPU
        state = ckpt["optimizer"]
        state["param_groups"] = [{**old, **{k: v for k, v in new.items() if k != "params"}}
                                 for old, new in zip(state["param_groups"], optimizer.state_dict()["param_groups"])]
        optimizer.load_state_dict(state)
        loader.load_state_dict(ckpt["loader"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        if torch.cuda.is_available() and len(ckpt["rng"]["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    except DataError as e:  # the checkpoint's data position does not fit --data, --seed or the batch
        raise DataError(f"--resume {path}: {e}") from e
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise TrainError(f"--resume {path}: not a usable train_gpt2.py checkpoint ({type(e).__name__}: {e})") from e
    return ckpt["step"]


def prepare_log_dir(args, start_step):
    """Rank 0, holding the lock, just before the first step: remove a checkpoint save cut short by a
    kill, and make log.jsonl this run's: a resumed run keeps the records of earlier steps; a fresh
    run starts a new log and keeps an earlier run's under another name (a log is never deleted).
    Returns the log's path."""
    log_path = os.path.join(args.log_dir, "log.jsonl")
    try:  # the partial file first: it may be what filled the disk
        logdir.remove_partial_checkpoints(args.log_dir)
        if start_step == 0:
            logdir.keep_earlier_log(log_path)
        else:
            logdir.trim_log(log_path, start_step)
    except OSError as e:
        raise TrainError(f"--log-dir {args.log_dir}: {e}") from e
    return log_path


def start_wandb(args, raw_model, world_size, run_id=None):
    """Rank 0 with --wandb-project: a wandb run (a new one, or the checkpoint's run_id continued) whose
    config is every flag, the model's shape and size, the world size and the torch version."""
    if args.wandb_project:
        config = {**vars(args), "model_config": dataclasses.asdict(raw_model.config),
                  "num_params": raw_model.num_params(), "world_size": world_size, "torch_version": torch.__version__}
        logdir.start_wandb(args.wandb_project, args.wandb_run_name, config, run_id)


# ---------------------------------------------------------------- command line


PRESETS = {  # named sets of defaults; flags given on the command line still win
    # a first run on any machine: a 6-layer model learns Tiny Shakespeare in under 3 minutes on 2 CPU
    # cores (tuned by measurement, BENCHMARKS.md). Most of its work is the 128 x 50,304 output layer,
    # so layers are cheap: 6 of them cost ~10% more than 4 and learn faster.
    "shakespeare": dict(data="input.txt", n_layer=6, n_head=4, n_embd=128, seq_len=128, batch_size=8,
                        total_batch_size=1024, max_steps=500, warmup_steps=20, lr=3e-3, eval_every=125,
                        print_every=25, sample_every=0, val_tokens=8192, hellaswag=False, num_samples=1,
                        sample_tokens=160, sample_prompt="ROMEO:", checkpoint_every=0, log_dir="log/shakespeare"),
}


def check_batch_layout(args, world_size):
    """grad_accum_steps: how many micro-batches of B x T each of world_size ranks runs per step."""
    per_micro_step = args.batch_size * args.seq_len * world_size
    if args.total_batch_size % per_micro_step:
        raise TrainError(f"--total-batch-size {args.total_batch_size:,} is not a multiple of --batch-size "
                         f"{args.batch_size} x --seq-len {args.seq_len} x world size {world_size} = {per_micro_step:,}")
    return args.total_batch_size // per_micro_step


def check_val_steps(args, world_size, val_tokens_available):
    """Val batches per eval: --val-tokens (at most what the val data holds) in whole B x T x world batches."""
    per_batch = args.batch_size * args.seq_len * world_size
    steps = min(args.val_tokens, val_tokens_available - 1) // per_batch
    if steps == 0:
        raise TrainError(f"--val-tokens {args.val_tokens:,}: val loss needs at least one batch-size x seq-len x "
                         f"world-size batch of {per_batch:,} tokens (the val data holds {val_tokens_available:,})")
    return steps


def integer(min_value):
    def parse(text):
        if not text.lstrip("-").isdigit() or int(text) < min_value:
            raise argparse.ArgumentTypeError(f"expected an integer >= {min_value}, got {text!r}")
        return int(text)
    return parse


def number(low, high=math.inf, low_open=False):
    """A finite float in [low, high] (or (low, high] with low_open): inf and nan never get through."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"expected a finite number {'>' if low_open else '>='} {low}"
                                             f"{f' and <= {high}' if high < math.inf else ''}, got {text!r}")
        return value
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named set of defaults (flags you give "
                   "still win): shakespeare = a 6-layer model on Tiny Shakespeare, under 3 minutes on a 2-core CPU")
    p.add_argument("--data", default="edu_fineweb10B", help="a directory of uint16 .npy shards (*_train_*, *_val_*) "
                   "from fineweb.py, or a .txt file tokenized at start (first 90%% train, last 10%% val)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="gpt2", choices=list(OPENAI_SIZES), help="shape: one of OpenAI's (gpt2 = 124M)")
    g.add_argument("--n-layer", type=integer(1), help="override the number of layers of --model")
    g.add_argument("--n-head", type=integer(1), help="override the number of attention heads of --model")
    g.add_argument("--n-embd", type=integer(1), help="override the embedding width of --model")
    g.add_argument("--padded-vocab-size", type=integer(0), default=50304, help="embedding rows; 50304 (a multiple "
                   "of 128) is faster than the real 50257; 0 = no padding")
    g.add_argument("--init-from", help="fine-tune: start from an OpenAI size (gpt2, ...), a Hugging Face directory "
                   "or a checkpoint file instead of random weights (the shape flags are then ignored)")

    g = p.add_argument_group("batch")
    g.add_argument("--batch-size", type=integer(1), default=64, help="micro-batch: sequences per rank per forward "
                   "pass (if memory runs out, lower it: the accumulation grows, the total batch stays)")
    g.add_argument("--seq-len", type=integer(1), default=1024, help="tokens per sequence (a new model's block size)")
    g.add_argument("--total-batch-size", type=integer(1), default=524288, help="tokens per optimizer step, all ranks "
                   "and micro-steps together: a multiple of batch-size x seq-len x world size")

    g = p.add_argument_group("optimization")
    g.add_argument("--max-steps", type=integer(1), default=19073, help="optimizer steps (19,073 x 524,288 = 10B)")
    g.add_argument("--warmup-steps", type=integer(0), default=715, help="steps of linear learning-rate warmup")
    g.add_argument("--lr", type=number(0, low_open=True), default=6e-4, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=number(0, 1), default=0.1, help="the cosine ends at --lr times this")
    g.add_argument("--weight-decay", type=number(0), default=0.1, help="AdamW weight decay of matrices only")
    g.add_argument("--grad-clip", type=number(0), default=1.0, help="clip the global gradient norm to this; 0 = off")
    g.add_argument("--seed", type=integer(0), default=1337, help="seeds the initial weights, the data order, sampling")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=integer(0), default=250, help="val loss and HellaSwag every N steps and at "
                   "the end (0: at the end only)")
    g.add_argument("--val-tokens", type=integer(1), default=20 * 524288, help="tokens per val loss: always the first "
                   "ones of the val data, rounded down to whole batch-size x seq-len x world-size batches")
    g.add_argument("--hellaswag", action=argparse.BooleanOptionalAction, default=True, help="HellaSwag acc_norm at "
                   "each eval (downloaded once into hellaswag/; skipped with one line if unavailable)")
    g.add_argument("--hellaswag-file", help="a local HellaSwag .jsonl to evaluate instead of the downloaded val split")
    g.add_argument("--sample-every", type=integer(0), default=250, help="print samples every N steps and at the end "
                   "(0: at the end only)")
    g.add_argument("--num-samples", type=integer(0), default=4, help="samples per rank each time")
    g.add_argument("--sample-tokens", type=integer(1), default=32, help="new tokens per sample")
    g.add_argument("--sample-prompt", default="Hello, I'm a language model,", help="the prompt the samples continue")

    g = p.add_argument_group("checkpoints and log")
    g.add_argument("--log-dir", default="log", help="where log.jsonl and the checkpoints ckpt_NNNNNN.pt go")
    g.add_argument("--print-every", type=integer(1), default=1, help="print the step line every N steps and at "
                   "the last (log.jsonl records every step)")
    g.add_argument("--checkpoint-every", type=integer(0), default=5000, help="checkpoint every N steps, and always "
                   "at the end and on SIGTERM/SIGINT")
    g.add_argument("--keep-checkpoints", type=integer(1), default=3, help="keep only the newest K checkpoints")
    g.add_argument("--resume", help="'auto': from the newest checkpoint in --log-dir (if any); or a checkpoint file")
    g.add_argument("--wait-for-lock", action="store_true", help="if another run holds --log-dir, wait until it "
                   "ends instead of stopping with an error (a requeued job: the preempted one writes its checkpoint "
                   "first, then --resume auto continues from it)")
    g.add_argument("--wandb-project", help="also log to this Weights & Biases project (pip install wandb): every "
                   "log.jsonl record, the samples and the config; a resumed run continues the same wandb run")
    g.add_argument("--wandb-run-name", help="the wandb run's display name; without it, wandb picks one")
    g.add_argument("--eval-only", action="store_true", help="no training: the val loss (the tokens of training's "
                   "evals) and HellaSwag of --init-from MODEL, printed and appended to --log-dir's log.jsonl")

    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, mps; under torchrun "
                   "each rank takes cuda:LOCAL_RANK")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast dtype: auto = "
                   "bfloat16 on CUDA and on a CPU with native bfloat16 (AVX512-BF16, AMX, ARM BF16; GPT2_CPU_BF16=0/1 "
                   "overrides the detection), else float32 (weights and optimizer state are float32 always)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model "
                   "for training (default: on with CUDA; elsewhere off: it needs a C++ compiler and starts slowly)")
    g.add_argument("--peak-tflops", type=number(0, low_open=True), default=H100_BF16_PEAK_FLOPS / 1e12,
                   help="one device's dense bf16 peak, for MFU (H100/H200 SXM: 989, A100: 312)")
    g.add_argument("--deterministic", action="store_true", help="PyTorch's deterministic algorithms "
                   "(torch.use_deterministic_algorithms; CUBLAS_WORKSPACE_CONFIG=:4096:8 unless set). On CUDA some "
                   "kernels (embedding backward, flash attention backward) are otherwise nondeterministic, so only "
                   "with it do resumed GPU runs reproduce bit for bit; it may be slower")
    args = p.parse_args(argv)
    if args.preset:  # parse again with the preset as defaults, so that explicit flags still win
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)
    # AdamW computes lr / (1 - beta1) = 10 lr and lr x weight decay as float32 scalars: past float32's
    # largest value, optimizer.step() raises an overflow error at the first step
    if args.lr * max(10, args.weight_decay) > torch.finfo(torch.float32).max:
        p.error(f"--lr {args.lr:g} with --weight-decay {args.weight_decay:g} overflows AdamW's float32 arithmetic "
                "(10 x lr and lr x weight decay must stay below 3.4e38): use a far smaller --lr")
    if args.num_samples and not args.sample_prompt:  # found now, not at the first sample hours later
        p.error("--sample-prompt is empty: samples continue a prompt of at least one token (or pass --num-samples 0)")
    if args.wandb_run_name and not args.wandb_project:
        p.error("--wandb-run-name names a run of --wandb-project: pass --wandb-project too")
    if args.wandb_project and importlib.util.find_spec("wandb") is None:  # imported only when used
        p.error("--wandb-project needs the wandb package: pip install wandb")
    if args.eval_only and not args.init_from:
        p.error("--eval-only needs --init-from MODEL: an OpenAI size (gpt2, ...), a Hugging Face directory or a "
                "train_gpt2.py checkpoint file")
    if args.eval_only and args.resume:
        p.error("--eval-only trains nothing, so there is nothing to --resume: to evaluate a checkpoint, pass it "
                "as --init-from")
    return args


def main(argv=None):
    args = parse_args(argv)
    STOP.update(signal=None, error=None)
    handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    status = 1  # an unexpected exception: wandb marks the run failed
    try:
        status = eval_only(args) if args.eval_only else train(args)
    except (TrainError, DataError, LogDirError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        status = 2
    except Diverged as e:
        print0(f"error: {e}", file=sys.stderr)
        status = 1
    finally:  # a signal here, the outcome decided, only sets the flag: the exit status stays
        logdir.finish_wandb(status)  # before the lock goes: a requeued run may continue the same wandb run
        logdir.unlock_log_dir()
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])  # as it was
        for s, handler in handlers.items():  # as they were, for callers in this process (tests)
            signal.signal(s, handler)
        pause_point("exit")  # tests signal here
    return status


if __name__ == "__main__":
    # The script keeps the stop flag as its handler to the very end (main restores this one): a
    # second signal while Python shuts down (a preemption often sends two) must not turn exit 0
    # into a death by SIGTERM.
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, request_stop)
    # glibc keeps the blocks it frees (a CPU run's logits: its steps are 2-3x faster, BENCHMARKS.md).
    # It changes the whole process for good, so only here: not when a test or a notebook calls main().
    utils.keep_freed_memory()
    sys.exit(main())
