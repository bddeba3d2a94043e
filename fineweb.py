"""FineWeb-edu -> GPT-2 token shards: `edufineweb_{val,train}_NNNNNN.npy`, read by train_gpt2.py.

Every document becomes [EOT] + tiktoken-gpt2(text), and the documents are concatenated, in dataset
order, into one token stream that is cut into `.npy` uint16 arrays of exactly --shard-size tokens
(the last one may be shorter). Shard 0 is the validation shard, the rest are training shards.

A shard's contents depend only on the dataset and the settings, never on --workers or on where an
earlier run stopped: so an interrupted run resumes exactly. manifest.json records, for each finished
shard, the stream position (document index, token offset into that document) where it starts and
ends, and its largest token id ("max_token": train_gpt2.py checks that instead of reading the shards);
a re-run checks the settings, skips the finished shards' documents and continues mid-document.
The manifest is written before the first shard, so a shard file it does not list is a leftover of a
killed run (overwritten by the re-run); shards in a directory with no manifest are refused.
Ctrl-C or SIGTERM stops a run cleanly (exit 130 or 143); the tokenizer processes never outlive the
main process, even when it is killed outright (Linux).

    python fineweb.py                                  # sample-10BT -> edu_fineweb10B/ (~100 shards)
    python fineweb.py --data-files 'corpus/*.jsonl' --out shards/ --shard-size 1000000
    python fineweb.py --data-files big.jsonl --benchmark   # tokens/s with 1 worker vs --workers
"""
import argparse
import ctypes
import glob
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import tiktoken
from tqdm import tqdm

from utils import atomic_write, pause_point

EOT = 50256  # <|endoftext|>: precedes every document
VOCAB_SIZE = 50257  # GPT-2's token ids are 0 ... EOT
TOKENIZER = "gpt2"
# A pool task is a batch of whole documents of about this many characters (~25k tokens, ~10 ms of
# work): big enough that the main process handles one array per batch, not per document, and so keeps
# up with many workers even on short documents; small enough to spread the work evenly.
TASK_CHARS = 100_000
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


class DataError(Exception):
    """Bad input or --out: main() prints the message and exits 2."""


class WorkerDied(Exception):
    """A tokenizer process was killed (out of memory?): main() says so and exits 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill PID`, a job scheduler, a shutdown): main() stops exactly as on Ctrl-C, exit 143."""


def _terminate(signum, frame):
    raise Terminated()


# ---- tokenization (runs in the pool workers) ----------------------------------------------------
_enc = _ds = _what = None


def _init_worker(parent, ds=None, what=None):
    global _enc, _ds, _what
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process stops the pool, quietly
    # SIGTERM kills a worker, as by default (the pool itself stops a broken pool's workers with it), not
    # main()'s handler, inherited through fork, which would print a traceback in each worker
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    pause_point("fineweb.worker_start")  # tests kill the main process here, before the next line
    die_with_parent(parent)
    _enc = tiktoken.get_encoding(TOKENIZER)  # once per worker, not once per document
    _ds, _what = ds, what  # a map-style dataset is memory-mapped Arrow: each worker reads its own rows


def die_with_parent(parent):
    """Have the kernel SIGKILL this worker when its parent process dies. Otherwise a worker whose main
    process was killed (SIGKILL, the out-of-memory killer) lives on, reparented, waiting forever for
    tasks: its own copy of the task queue's pipe keeps the queue open. Linux only; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the prctl, so no signal will come: go now
        os._exit(1)


def tokenize_rows(rows):
    """tokenize() of the documents ds[start:stop], read by the worker itself: so the main process
    hands out two numbers per task instead of the texts, and keeps up with many more workers."""
    start, stop = rows
    texts = _ds[start:stop]["text"]
    check_texts(texts, _what)
    return tokenize(texts)


def tokenize(texts):
    """[EOT] + ordinary GPT-2 tokens of each text, all concatenated as uint16, and each one's length.

    Ordinary: a literal `<|endoftext|>` inside a text is encoded as plain text, never as EOT."""
    tokens, lengths = [], []
    for text in texts:
        ids = _enc.encode_ordinary(text)
        tokens += [EOT] + ids
        lengths.append(len(ids) + 1)
    tokens = np.array(tokens, dtype=np.uint32)
    if tokens.max() >= 2**16:  # never for gpt2 (50257 tokens); guards a different tokenizer
        raise ValueError(f"token id {tokens.max()} does not fit uint16")
    return tokens.astype(np.uint16), np.array(lengths)


def load_tokenizer():
    """tiktoken's GPT-2 encoding: downloaded once into tiktoken's cache, so offline it needs one."""
    try:
        return tiktoken.get_encoding(TOKENIZER)
    except OSError as e:  # requests' ConnectionError is an OSError
        raise DataError(f"could not load tiktoken's {TOKENIZER!r} encoding ({type(e).__name__}); it is downloaded "
                        "once, then cached: offline, set TIKTOKEN_CACHE_DIR to a directory holding that cache") from e


# ---- input ---------------------------------------------------------------------------------------
def resolve_files(patterns):
    """Expand globs (sorted within each pattern, patterns in the order given) to absolute paths.

    A file that exists is taken literally, glob characters in its name or not: `corpus[1].jsonl`
    names that file, never the pattern that matches `corpus1.jsonl`."""
    files = []
    for pattern in patterns:
        matches = [pattern] if os.path.isfile(pattern) else sorted(glob.glob(pattern))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(f"--data-files {pattern!r}: no such file")
        files += [os.path.abspath(m) for m in matches]
    for f in files:
        if os.path.getsize(f) == 0:  # `datasets` fails on these with a bare StopIteration
            raise DataError(f"--data-files: {f} is empty (0 bytes): there are no documents to tokenize")
    exts = {os.path.splitext(f)[1].lower() for f in files}
    if not exts <= FORMATS.keys() or len({FORMATS[e] for e in exts}) != 1:
        raise DataError(f"--data-files: expected files of one format among {sorted(FORMATS)}, got {sorted(exts)}")
    return files


def settings_of(args):
    """What shard contents depend on: a re-run into the same --out must match these exactly. For
    local files that includes each one's size and modification time, so that a file rewritten
    between two runs is noticed rather than resumed into."""
    if args.data_files:
        files = [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in resolve_files(args.data_files)]
        return {"dataset": "local files", "data_files": files, "name": None,
                "split": "train", "tokenizer": TOKENIZER, "shard_size": args.shard_size}
    return {"dataset": args.dataset, "data_files": None, "name": args.name, "split": args.split,
            "tokenizer": TOKENIZER, "shard_size": args.shard_size}


def load_documents(settings, streaming):
    """The dataset, reduced to its `text` column (other columns are never decoded)."""
    import datasets  # only this script needs `datasets`; the GPU machine may not have it

    files, what = [f for f, _, _ in settings["data_files"] or []], source(settings)
    try:
        if files:
            builder = FORMATS[os.path.splitext(files[0])[1].lower()]
            extra = {"sample_by": "document"} if builder == "text" else {}  # a .txt file is one document
            # `datasets` reads data_files as glob patterns: escaped, each names exactly our file
            ds = datasets.load_dataset(builder, data_files=[glob.escape(f) for f in files], split="train",
                                       streaming=streaming, **extra)
        else:
            ds = datasets.load_dataset(settings["dataset"], name=settings["name"], split=settings["split"],
                                       streaming=streaming)
    except Exception as e:  # datasets raises many types (DatasetGenerationError, ArrowInvalid, OSError ...)
        if isinstance(e, UnicodeDecodeError) or isinstance(e.__cause__ or e.__context__, UnicodeDecodeError):
            raise not_utf8(settings) from e  # a .txt file is decoded here; other formats when read
        raise DataError(f"could not read {what}: {describe(e)}") from e
    columns = ds.column_names  # None for some streaming datasets: then batches() checks the rows
    if columns is not None and "text" not in columns:
        raise DataError(f"{what} has no 'text' column (columns: {columns})")
    if not streaming and len(ds) == 0:
        raise DataError(f"{what} is empty: no documents to tokenize")
    return (ds.select_columns(["text"]) if columns is not None else ds), what


def source(settings):
    """The data, in words, for messages."""
    files = [f for f, _, _ in settings["data_files"] or []]
    more = f" (+{len(files) - 1} more)" if len(files) > 1 else ""
    return f"--data-files {files[0]}{more}" if files else f"{settings['dataset']} ({settings['name']})"


def not_utf8(settings):
    """The error for a text that is not valid UTF-8. `datasets` only finds out when it decodes a row
    (in a worker, or in the main process), and does not say where: the local text files are read again
    now, up to the first line that does not decode, to name it."""
    files = [f for f, _, _ in settings["data_files"] or [] if FORMATS[os.path.splitext(f)[1].lower()] != "parquet"]
    for path in files:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    return DataError(f"--data-files {path}, line {number}: not valid UTF-8 ({e.reason} at byte "
                                     f"{e.start + 1} of the line): re-encode the file as UTF-8, or remove that line")
    return DataError(f"{source(settings)}: a document's text is not valid UTF-8: re-encode it as UTF-8")


def check_texts(texts, what):
    for text in texts:
        if not isinstance(text, str):
            raise DataError(f"{what}: a document's 'text' is {type(text).__name__}, not a string")


def row_ranges(ds, skip):
    """Pool tasks for a map-style dataset: (start, stop) rows of ~TASK_CHARS, from document `skip` on.

    The rows per task come from the average length of the first documents."""
    sample = [len(text) for text in ds[:1000]["text"] if isinstance(text, str)]
    rows = max(1, round(TASK_CHARS * len(sample) / max(1, sum(sample))))
    for start in range(skip, len(ds), rows):
        yield start, min(start + rows, len(ds))


def batches(ds, what, skip):
    """Lists of document texts (pool tasks of ~TASK_CHARS), in order, from document `skip` on:
    for a streaming dataset, which only the main process can read."""
    task, chars = [], 0
    try:
        for rows in (ds.skip(skip) if skip else ds).iter(batch_size=1024):  # far faster than row by row
            if "text" not in rows:
                raise DataError(f"{what} has no 'text' column (columns: {list(rows)})")
            check_texts(rows["text"], what)
            for text in rows["text"]:
                task.append(text)
                chars += len(text)
                if chars >= TASK_CHARS:
                    yield task
                    task, chars = [], 0
        if task:
            yield task
    except (DataError, UnicodeDecodeError):  # write_shards names the line that is not UTF-8
        raise
    except Exception as e:  # a file that fails part-way through a streaming read
        raise DataError(f"could not read {what}: {describe(e)}") from e


def describe(error):
    """`Type: message`, and the cause's too: DatasetGenerationError's own message says nothing."""
    cause = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {error}" + (f" (because {type(cause).__name__}: {cause})" if cause else "")


# ---- output --------------------------------------------------------------------------------------
def shard_name(index):
    return f"edufineweb_{'val' if index == 0 else 'train'}_{index:06d}.npy"


def read_manifest(out, settings):
    """The manifest of --out, checked against `settings`; finished shards whose files are intact.

    write_shards writes the manifest before the first shard and lists each shard once its file is
    complete: a shard file that the manifest does not list is left by a killed run, and the re-run
    overwrites it. Shards with no manifest at all were made by something else, and are refused."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out} is a file, not a directory: choose another --out")
    path = os.path.join(out, "manifest.json")
    if not os.path.exists(path):
        names = os.listdir(out) if os.path.isdir(out) else []  # not glob: an --out like `runs/x[1]` is no pattern
        if any(n.startswith("edufineweb_") and n.endswith(".npy") for n in names):
            raise DataError(f"--out {out} holds shards but no manifest.json: use an empty --out or delete them")
        return {**settings, "shards": [], "documents": None, "tokens": None, "complete": False}
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"--out {out}: unreadable manifest.json ({e}): delete --out and start again") from e
    for key, value in settings.items():
        if manifest.get(key) != value:
            raise DataError(f"--out {out} holds shards made with {key}={manifest.get(key)!r}, not {value!r}: "
                            "use another --out, or delete it to start again")
    older = False  # a manifest of a fineweb.py that did not record max_token yet
    for i, shard in enumerate(manifest["shards"]):  # keep the intact prefix; redo from the first bad shard
        try:
            tokens = np.load(os.path.join(out, shard["file"]), mmap_mode="r")
            ok = tokens.shape == (shard["tokens"],)
            if ok and "max_token" not in shard:  # read the whole shard, this once
                shard["max_token"], older = int(tokens.max()), True
        except (OSError, ValueError):
            ok = False
        if not ok or shard["max_token"] >= VOCAB_SIZE:
            manifest.update(shards=manifest["shards"][:i], documents=None, tokens=None, complete=False)
            break
    if older:  # saved now: a complete directory gets no later manifest write that would save it
        write_manifest(out, manifest)
    return manifest


def write_manifest(out, manifest):
    try:
        atomic_write(os.path.join(out, "manifest.json"), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    except OSError as e:  # a full disk, no permission...: the manifest before it is kept
        raise DataError(f"--out {out}: could not write manifest.json ({e})") from e


def write_shards(ds, what, settings, out, workers, max_shards=None, progress=True):
    """Tokenize `ds` into shards under `out`, resuming from its manifest. Returns the manifest."""
    manifest = read_manifest(out, settings)
    shards, size = manifest["shards"], settings["shard_size"]
    if manifest["complete"] or (max_shards is not None and len(shards) >= max_shards):
        return manifest
    doc, offset = shards[-1]["end"] if shards else (0, 0)  # next token: tokens(doc)[offset]
    start, buf, fill = (doc, offset), np.empty(size, dtype=np.uint16), 0
    bar = None

    def flush(end):  # shard file first, then the manifest that vouches for it
        name = shard_name(len(shards))
        try:
            os.makedirs(out, exist_ok=True)
            if not shards:  # a manifest (the settings, no shards) exists before any shard does: see read_manifest
                write_manifest(out, manifest)
            # max_token, of the very tokens written: train_gpt2.py checks it instead of reading every shard
            max_token = int(buf[:fill].max())
            # temporary file, fsync, rename: a crash never leaves a truncated shard under its name
            nbytes = 2 * fill + 128  # uint16 tokens and the .npy header: the free space is checked first
            atomic_write(os.path.join(out, name), lambda f: np.save(f, buf[:fill]), size_hint=nbytes)
            pause_point("fineweb.before_manifest")  # tests kill here: a shard that the manifest does not list yet
            shards.append({"file": name, "tokens": fill, "max_token": max_token, "start": start, "end": end})
            write_manifest(out, manifest)
        except OSError as e:  # a full disk (atomic_write's message says what to do), no permission...:
            raise DataError(f"--out {out}: could not write {name} ({e})") from e  # finished shards are kept
        pause_point("fineweb.after_shard")  # tests signal or kill here: mid-run, at a known shard
        if bar is not None:
            bar.close()

    import datasets

    if isinstance(ds, datasets.Dataset):  # map-style: the workers read their own rows
        work, tasks, shared = tokenize_rows, row_ranges(ds, skip=doc), ds
    else:  # streaming: the main process reads, and sends the texts
        work, tasks, shared = tokenize, batches(ds, what, skip=doc), None
    load_tokenizer()  # loaded (~0.3 s) once here: forked workers inherit tiktoken's cache
    # fork (Linux's default before Python 3.14) on Linux: the workers start at once with the tokenizer
    # loaded, and are children of this process, which die_with_parent checks
    context = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(os.getpid(), shared, what)) as pool:
            for tokens, lengths in in_order(pool, work, tasks, ahead=4 * workers):
                ends = np.cumsum(lengths)  # where each document of the batch ends, within `tokens`
                pos, offset = offset, 0  # only the first batch of a resumed run starts mid-document
                while pos < len(tokens):  # the batch may fill the current shard, or several
                    if bar is None:
                        bar = tqdm(total=size, unit="tok", unit_scale=True, desc=shard_name(len(shards)),
                                   disable=not progress)
                    n = min(len(tokens) - pos, size - fill)
                    buf[fill:fill + n] = tokens[pos:pos + n]
                    fill, pos = fill + n, pos + n
                    bar.update(n)
                    if fill == size:  # the next token is document doc + i, at `pos - ends[i - 1]` into it
                        i = int(np.searchsorted(ends, pos, side="right"))
                        end = (doc + i, pos - int(ends[i - 1]) if i else pos)
                        flush(end)
                        if max_shards is not None and len(shards) >= max_shards:
                            return manifest  # leaving `with` terminates the pool
                        start, fill, bar = end, 0, None
                doc += len(lengths)
    except UnicodeDecodeError as e:  # from `datasets`, decoding a row here or in a worker
        raise not_utf8(settings) from e
    finally:  # an error or Ctrl-C mid-shard: its message goes below the progress bar, not at its end
        if bar is not None:
            bar.close()
    if doc == 0:
        raise DataError(f"{what} is empty: no documents to tokenize")
    if fill:
        flush((doc, 0))  # the final, partial shard
    manifest.update(documents=doc, tokens=sum(s["tokens"] for s in shards), complete=True)
    write_manifest(out, manifest)
    return manifest


def in_order(pool, work, tasks, ahead):
    """work(task) for each task, computed by the pool and yielded in task order, with at most `ahead`
    tasks in flight: the workers run ahead of the main process, but results never pile up in memory.
    (Unlike multiprocessing.Pool, whose imap waits forever if a worker is killed, a dead worker
    here raises BrokenProcessPool.)"""
    pending = deque()
    try:
        for task in tasks:
            pending.append(pool.submit(work, task))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as e:
        raise WorkerDied("a tokenizer process died (killed by the out-of-memory killer? try fewer --workers)") from e
    finally:  # stopped early (--max-shards, Ctrl-C, an error): drop the queued tasks
        for future in pending:
            future.cancel()


# ---- command line --------------------------------------------------------------------------------
def benchmark(ds, what, settings, workers):
    """Tokens/s of the whole pipeline (read, tokenize, write) with 1 worker and with `workers`.

    Also the CPU time of the main process (reading the dataset, handing out tasks, copying into
    shards, writing them): tokens / that time is the most it could ever feed, however many workers."""
    print(f"benchmark: {what}, shard size {settings['shard_size']:,}")  # main() loaded the tokenizer already
    rates = {}
    for n in sorted({1, workers}):
        with tempfile.TemporaryDirectory() as out:
            t0, cpu0 = time.perf_counter(), time.process_time()  # process_time: this process only
            manifest = write_shards(ds, what, settings, out, n, progress=False)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        tokens = manifest["tokens"]
        rates[n] = tokens / seconds
        print(f"  workers {n:3d}: {tokens:,} tokens in {seconds:.2f}s = {rates[n]:,.0f} tokens/s "
              f"(speedup {rates[n] / rates[1]:.2f}x); main process {cpu / seconds:.0%} of a core, "
              f"could feed {tokens / cpu:,.0f} tokens/s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="Hugging Face dataset (default: %(default)s)")
    p.add_argument("--name", help="dataset config, e.g. sample-100BT (default: sample-10BT for fineweb-edu, "
                   "none for another --dataset)")
    p.add_argument("--split", default="train", help="dataset split (default: %(default)s)")
    p.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it first")
    p.add_argument("--data-files", nargs="+", metavar="PATH", help="read local .jsonl/.json/.parquet files with a "
                   "'text' column, or .txt files (one document each), instead of --dataset; globs allowed (a file that "
                   "exists is taken literally, even with glob characters in its name)")
    p.add_argument("--out", default="edu_fineweb10B", help="shard directory (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=100_000_000, help="tokens per shard (default: %(default)s)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count(), help="tokenizer processes (default: every core this process may use)")
    p.add_argument("--max-shards", type=int, help="stop once --out holds this many shards (re-run to continue)")
    p.add_argument("--benchmark", action="store_true", help="print tokens/s with 1 worker and with --workers "
                   "(into a temporary directory; --out is not touched)")
    args = p.parse_args(argv)
    if args.name is None and args.dataset == "HuggingFaceFW/fineweb-edu":
        args.name = "sample-10BT"
    for flag in ("shard_size", "workers", "max_shards"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _terminate)  # restored below: tests call main() in-process
    try:
        settings = settings_of(args)
        load_tokenizer()  # offline with no cache: fail now, not after the download
        if args.benchmark:
            return benchmark(*load_documents(settings, args.streaming), settings, args.workers)
        manifest = read_manifest(args.out, settings)  # a wrong --out fails before the (long) download
        done = manifest["shards"]
        if done:
            print(f"resuming: {len(done)} finished shards in {args.out} are kept")
        if not (manifest["complete"] or (args.max_shards and len(done) >= args.max_shards)):
            ds, what = load_documents(settings, args.streaming)
            manifest = write_shards(ds, what, settings, args.out, args.workers, args.max_shards)
    except DataError as e:
        print(f"fineweb.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except WorkerDied as e:
        print(f"fineweb.py: error: {e}; finished shards are kept, re-run the same command to resume",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM; exit 128 + the signal's number, as a shell reports it
        print("\nfineweb.py: interrupted; finished shards are kept, re-run the same command to resume",
              file=sys.stderr)
        sys.exit(128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT))
    finally:
        if previous is not None:  # None: a handler installed outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)
    shards, seconds = manifest["shards"], time.perf_counter() - t0
    tokens, new = sum(s["tokens"] for s in shards), sum(s["tokens"] for s in shards[len(done):])
    documents = manifest["documents"] or shards[-1]["end"][0]
    state = "done" if manifest["complete"] else "stopped at --max-shards; re-run without it to continue"
    print(f"{state}: {documents:,} documents, {tokens:,} tokens, {len(shards)} shards "
          f"(1 val + {len(shards) - 1} train) in {args.out}")
    print(f"this run: {new:,} tokens in {seconds:.1f}s ({new / seconds:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
