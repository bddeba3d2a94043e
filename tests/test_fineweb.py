"""fineweb.py on small local corpora: exact shards, resuming after a stop or a kill, and bad input.

The reference for every shard is recomputed here from the documents with tiktoken directly:
the concatenation of all shards must equal [EOT] + encode_ordinary(doc) for every document, in order.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tiktoken

# fineweb.py alone needs `datasets` (requirements-test.txt has it); a GPU machine running
# `pytest -m gpu` may not, and must still collect the other modules
datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

import fineweb
from conftest import ROOT, SHAKESPEARE

EOT = 50256
ENC = tiktoken.get_encoding("gpt2")
PARAGRAPHS = [p for p in open(SHAKESPEARE, encoding="utf-8").read().split("\n\n") if p]
# A long first document spans several 1000-token shards, so shard boundaries fall mid-document;
# the others test what must be plain text: the literal "<|endoftext|>", an empty text, non-ASCII.
LONG = " ".join(PARAGRAPHS[:40])
SPECIAL = ["Plain text <|endoftext|> is not a separator.", "", "Émile naïve 東京 🙂 — déjà vu"]
DOCS = [LONG] + SPECIAL + PARAGRAPHS[40:400]


@pytest.fixture(autouse=True)
def small_tasks(tmp_path, monkeypatch):
    """Many pool tasks even on these small corpora (the killed-run test keeps the real size);
    and the Arrow cache that `datasets` builds from local files kept out of the user's ~/.cache."""
    monkeypatch.setattr(fineweb, "TASK_CHARS", 2000)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def reference(docs):
    return np.array([t for d in docs for t in [EOT] + ENC.encode_ordinary(d)], dtype=np.uint16)


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({key: d, "id": i}) + "\n")
    return str(path)


def write_parquet(path, docs):
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=50)
    return str(path)


def run(*args, workers=2):
    fineweb.main([*map(str, args), "--workers", str(workers)])


def shard_files(out):  # glob.escape: an --out may have glob characters in its name
    return sorted(glob.glob(os.path.join(glob.escape(str(out)), "edufineweb_*.npy")), key=lambda f: f[-10:])


def load_shards(out):
    arrays = [np.load(f, allow_pickle=False) for f in shard_files(out)]  # plain np.save arrays, no pickle
    assert all(a.dtype == np.uint16 and a.ndim == 1 for a in arrays)
    return arrays


def read_bytes(out):
    return {os.path.basename(f): open(f, "rb").read() for f in shard_files(out)}


@pytest.mark.parametrize("fmt, streaming, task_chars", [("jsonl", False, 1), ("parquet", True, 2000)])
def test_shards_are_the_exact_token_stream(tmp_path, capsys, monkeypatch, fmt, streaming, task_chars):
    monkeypatch.setattr(fineweb, "TASK_CHARS", task_chars)  # 1: one document per pool task
    # split across two files given as a glob: documents must come in file order, then row order
    write = write_jsonl if fmt == "jsonl" else write_parquet
    write(tmp_path / f"a.{fmt}", DOCS[:200])
    write(tmp_path / f"b.{fmt}", DOCS[200:])
    out = tmp_path / "shards"
    run("--data-files", tmp_path / f"*.{fmt}", "--out", out, "--shard-size", 1000, *(["--streaming"] * streaming))

    expected = reference(DOCS)
    shards = load_shards(out)
    names = [os.path.basename(f) for f in shard_files(out)]
    n = -(-len(expected) // 1000)  # ceil: the final partial shard is written too
    assert names == ["edufineweb_val_000000.npy"] + [f"edufineweb_train_{i:06d}.npy" for i in range(1, n)]
    assert [len(s) for s in shards[:-1]] == [1000] * (n - 1) and 0 < len(shards[-1]) <= 1000
    np.testing.assert_array_equal(np.concatenate(shards), expected)
    # the literal "<|endoftext|>" in a text is ordinary text: EOT occurs once per document, nowhere else
    assert (np.concatenate(shards) == EOT).sum() == len(DOCS)
    assert ENC.decode(np.concatenate(shards).tolist()) == "".join("<|endoftext|>" + d for d in DOCS)

    manifest = json.load(open(out / "manifest.json"))
    assert manifest["complete"] and manifest["documents"] == len(DOCS) and manifest["tokens"] == len(expected)
    assert manifest["tokenizer"] == "gpt2" and manifest["shard_size"] == 1000
    assert [s["tokens"] for s in manifest["shards"]] == [len(s) for s in shards]
    # each shard's recorded start (document, token offset into it) is where its first token comes from
    doc_starts = np.cumsum([0] + [len(ENC.encode_ordinary(d)) + 1 for d in DOCS])
    for k, shard in enumerate(manifest["shards"]):
        doc, offset = shard["start"]
        assert doc_starts[doc] + offset == 1000 * k and 0 <= offset < doc_starts[doc + 1] - doc_starts[doc]
        assert shard["end"] == (manifest["shards"][k + 1]["start"] if k + 1 < n else [len(DOCS), 0])
    files = [tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"]
    assert manifest["data_files"] == [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    printed = capsys.readouterr().out
    assert f"{len(DOCS):,} documents, {len(expected):,} tokens, {n} shards" in printed
    assert not glob.glob(str(out / "*.tmp"))


def test_txt_files_are_one_document_each(tmp_path):
    (tmp_path / "1.txt").write_text(PARAGRAPHS[0] + "\n\n" + PARAGRAPHS[1] + "\n", encoding="utf-8")
    (tmp_path / "2.txt").write_text(SPECIAL[2], encoding="utf-8")
    run("--data-files", tmp_path / "*.txt", "--out", tmp_path / "out", "--shard-size", 10_000)
    expected = reference([PARAGRAPHS[0] + "\n\n" + PARAGRAPHS[1] + "\n", SPECIAL[2]])
    np.testing.assert_array_equal(np.concatenate(load_shards(tmp_path / "out")), expected)


@pytest.mark.parametrize("streaming", [False, True])
def test_paths_with_glob_characters_are_taken_literally(tmp_path, capsys, streaming):
    """An existing file named `corpus[1].jsonl` is that file, not the glob that matches `corpus1.jsonl`
    (for fineweb.py and for `datasets`, which globs data_files too); an --out is never a glob."""
    data = write_jsonl(tmp_path / "corpus[1].jsonl", DOCS[:100])
    write_jsonl(tmp_path / "corpus1.jsonl", DOCS[100:200])  # what the glob `corpus[1].jsonl` matches
    out = tmp_path / "runs" / "x[1]"
    run("--data-files", data, "--out", out, "--shard-size", 1000, "--max-shards", 2, *(["--streaming"] * streaming))
    run("--data-files", data, "--out", out, "--shard-size", 1000, *(["--streaming"] * streaming))  # resumes
    assert "resuming: 2 finished shards" in capsys.readouterr().out
    np.testing.assert_array_equal(np.concatenate(load_shards(out)), reference(DOCS[:100]))
    assert json.load(open(out / "manifest.json"))["data_files"][0][0] == data
    # shards in an --out named like a glob, with no manifest, are someone else's: refused, untouched
    foreign = tmp_path / "runs" / "y[1]"
    foreign.mkdir()
    (foreign / "edufineweb_val_000000.npy").write_bytes(b"theirs")
    err = fails(capsys, "--data-files", data, "--out", foreign, "--shard-size", 1000)
    assert "holds shards but no manifest.json" in err
    assert os.listdir(foreign) == ["edufineweb_val_000000.npy"]


def test_shard_boundary_at_a_document_end(tmp_path):
    half = DOCS[1:40]
    size = len(reference(half))
    data = write_jsonl(tmp_path / "d.jsonl", half + half)  # boundaries fall exactly after documents 39, 78
    run("--data-files", data, "--out", tmp_path / "out", "--shard-size", size, "--max-shards", 1)
    run("--data-files", data, "--out", tmp_path / "out", "--shard-size", size)  # resumes at document 39
    assert [len(s) for s in load_shards(tmp_path / "out")] == [size, size]  # no empty third shard
    np.testing.assert_array_equal(np.concatenate(load_shards(tmp_path / "out")), reference(half + half))
    manifest = json.load(open(tmp_path / "out" / "manifest.json"))
    assert [(s["start"], s["end"]) for s in manifest["shards"]] == [([0, 0], [39, 0]), ([39, 0], [78, 0])]
    run("--data-files", data, "--out", tmp_path / "short", "--shard-size", 2 * size - 1)
    assert [len(s) for s in load_shards(tmp_path / "short")] == [2 * size - 1, 1]


def test_stop_after_n_shards_resumes_to_identical_shards(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", DOCS)
    run("--data-files", data, "--out", tmp_path / "ref", "--shard-size", 1000)
    out = tmp_path / "out"
    run("--data-files", data, "--out", out, "--shard-size", 1000, "--max-shards", 2)
    manifest = json.load(open(out / "manifest.json"))
    assert len(shard_files(out)) == 2 and not manifest["complete"]
    assert manifest["shards"][1]["end"][1] > 0  # the stop is mid-document (inside the long first one)
    assert "stopped at --max-shards" in capsys.readouterr().out
    # continue with another worker count and streaming: neither changes what a shard holds
    run("--data-files", data, "--out", out, "--shard-size", 1000, "--max-shards", 5, workers=1)
    assert len(shard_files(out)) == 5
    run("--data-files", data, "--out", out, "--shard-size", 1000, "--streaming")
    assert "resuming: 5 finished shards" in capsys.readouterr().out
    assert read_bytes(out) == read_bytes(tmp_path / "ref")
    assert json.load(open(out / "manifest.json")) == json.load(open(tmp_path / "ref" / "manifest.json"))


def test_manifest_records_each_shards_largest_token(tmp_path):
    """"max_token" per shard, which train_gpt2.py checks against the vocabulary instead of reading the
    shards. A manifest of an older fineweb.py lacks it: the re-run reads the shards it keeps to add
    it, and redoes one whose ids are not GPT-2's; a complete one gains the key, shards untouched."""
    data = write_jsonl(tmp_path / "d.jsonl", DOCS)
    ref = tmp_path / "ref"
    run("--data-files", data, "--out", ref, "--shard-size", 1000)
    expected = json.load(open(ref / "manifest.json"))
    assert [s["max_token"] for s in expected["shards"]] == [int(a.max()) for a in load_shards(ref)]

    def as_older_version(out):
        manifest = json.load(open(out / "manifest.json"))
        for shard in manifest["shards"]:
            del shard["max_token"]
        (out / "manifest.json").write_text(json.dumps(manifest))

    out = tmp_path / "out"
    run("--data-files", data, "--out", out, "--shard-size", 1000, "--max-shards", 4)
    as_older_version(out)
    corrupt = np.load(out / "edufineweb_train_000002.npy")
    corrupt[10] = 60000  # same length: only reading it finds this
    np.save(out / "edufineweb_train_000002.npy", corrupt)
    run("--data-files", data, "--out", out, "--shard-size", 1000)
    assert read_bytes(out) == read_bytes(ref) and json.load(open(out / "manifest.json")) == expected

    as_older_version(out)
    run("--data-files", data, "--out", out, "--shard-size", 1000)
    assert read_bytes(out) == read_bytes(ref) and json.load(open(out / "manifest.json")) == expected


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_is_an_error_that_keeps_the_finished_shards(tmp_path, capsys):
    """A full disk while a shard is written. Here the shard's temporary file is a link to /dev/full,
    where every write fails with ENOSPC as on a full disk: exit 2 and a message saying what to do,
    the finished shards and manifest intact, no temporary file left; then the same command finishes."""
    data = write_jsonl(tmp_path / "d.jsonl", DOCS)
    out = tmp_path / "out"
    run("--data-files", data, "--out", out, "--shard-size", 1000, "--max-shards", 3)
    shards, manifest = read_bytes(out), json.load(open(out / "manifest.json"))
    os.symlink("/dev/full", out / "edufineweb_train_000003.npy.tmp")
    err = fails(capsys, "--data-files", data, "--out", out, "--shard-size", 1000)
    assert f"--out {out}: could not write edufineweb_train_000003.npy" in err
    assert "no space left on device" in err and "Free some space" in err and "run the same command again" in err
    assert read_bytes(out) == shards and json.load(open(out / "manifest.json")) == manifest
    assert not os.path.lexists(out / "edufineweb_train_000003.npy.tmp")

    run("--data-files", data, "--out", out, "--shard-size", 1000)
    np.testing.assert_array_equal(np.concatenate(load_shards(out)), reference(DOCS))


def test_missing_shard_is_rewritten(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", DOCS)
    out = tmp_path / "out"
    run("--data-files", data, "--out", out, "--shard-size", 1000)
    before = read_bytes(out)
    os.remove(out / "edufineweb_train_000003.npy")
    run("--data-files", data, "--out", out, "--shard-size", 1000)
    assert read_bytes(out) == before


def wait_until(condition, what, timeout=120):
    """Poll for a condition that a correct program always reaches; the timeout only ends a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout}s for {what}"
        time.sleep(0.01)


@pytest.fixture
def start_paused(tmp_path):
    """start_paused(pause_at, *args) runs fineweb.py in a process of its own, in its own process group
    (so that killpg reaches its tokenizer workers too), and returns (process, flag) once the program
    waits in utils.pause_point(pause_at): the test signals it there, at an exact moment, then deletes
    `flag` to let it go on. Whatever is still running at the end of the test is killed."""
    started = []

    def start(pause_at, *args, workers=2):
        flag = tmp_path / "paused"
        env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache"),
               "GPT2_PAUSE_AT": pause_at, "GPT2_PAUSE_FILE": str(flag)}
        cmd = [sys.executable, os.path.join(ROOT, "fineweb.py"), *map(str, args), "--workers", str(workers)]
        with open(tmp_path / "stderr.txt", "w") as stderr:
            proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)
        started.append(proc)
        wait_until(lambda: flag.exists() or proc.poll() is not None, f"pause point {pause_at}")
        assert proc.poll() is None, f"ended before {pause_at}: {(tmp_path / 'stderr.txt').read_text()[-2000:]}"
        return proc, flag

    yield start
    for proc in started:  # the whole group: a test that failed may have left orphaned workers too
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # nothing left in it
            pass
        proc.wait()


def process_stat(pid):
    """(state, parent pid, start time) of a process, from /proc/PID/stat; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "PID (name)": the name may hold spaces
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[19])


def children(pid):
    """{pid: start time} of the processes whose parent is pid (the start time tells a reused pid apart)."""
    stats = {int(p): process_stat(p) for p in os.listdir("/proc") if p.isdigit()}
    return {p: s[2] for p, s in stats.items() if s is not None and s[1] == pid}


def alive(pid, start_time):
    stat = process_stat(pid)  # a zombie ("Z") has exited already: only its exit status waits to be read
    return stat is not None and stat[0] != "Z" and stat[2] == start_time


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_run_resumes_to_identical_shards(tmp_path, start_paused, sig):
    """SIGKILL to the process group: main process and worker pool die with no clean-up at all.
    SIGINT to the process group: what Ctrl-C does; a short message, exit 130, no stray files.
    Either arrives right after the first shard is finished (a pause point), never at a lucky moment."""
    docs = PARAGRAPHS  # 330k tokens, 166 shards: the kill (after 1) lands mid-run
    data = write_jsonl(tmp_path / "d.jsonl", docs)
    out = tmp_path / "out"
    proc, flag = start_paused("fineweb.after_shard", "--data-files", data, "--out", out, "--shard-size", 2000,
                              "--streaming")
    os.killpg(proc.pid, sig)
    flag.unlink()  # a SIGINT is handled once the program runs on
    proc.wait(timeout=120)
    manifest = json.load(open(out / "manifest.json"))
    assert len(manifest["shards"]) == 1 and not manifest["complete"]
    for f in shard_files(out):  # whatever the kill interrupted, no shard file is truncated
        np.load(f)
    if sig == signal.SIGINT:
        err = open(tmp_path / "stderr.txt").read()
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
        assert not glob.glob(str(out / "*.tmp"))
    else:
        assert proc.returncode == -signal.SIGKILL

    run("--data-files", data, "--out", out, "--shard-size", 2000)
    run("--data-files", data, "--out", tmp_path / "ref", "--shard-size", 2000)
    assert read_bytes(out) == read_bytes(tmp_path / "ref")
    np.testing.assert_array_equal(np.concatenate(load_shards(out)), reference(docs))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_workers_die_with_a_killed_main_process(tmp_path, start_paused):
    """SIGKILL to the main process alone (what the out-of-memory killer does): its tokenizer workers
    must not live on, reparented, each holding its memory. 30 s is no race: they must get there."""
    data = write_jsonl(tmp_path / "d.jsonl", DOCS)
    proc, flag = start_paused("fineweb.after_shard", "--data-files", data, "--out", tmp_path / "out",
                              "--shard-size", 1000)
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=120)
    wait_until(lambda: not any(alive(pid, t) for pid, t in workers.items()), "the workers to exit", timeout=30)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_worker_whose_parent_died_before_it_was_set_up_exits(tmp_path, start_paused):
    """The main process killed while a worker starts, before the worker asks for the parent-death
    signal, which then never comes: the worker must notice its parent is gone and exit."""
    data = write_jsonl(tmp_path / "d.jsonl", DOCS)
    proc, flag = start_paused("fineweb.worker_start", "--data-files", data, "--out", tmp_path / "out",
                              "--shard-size", 1000, workers=1)
    workers = children(proc.pid)
    assert len(workers) == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=120)  # once it is reaped, the worker has a new parent
    flag.unlink()
    wait_until(lambda: not any(alive(pid, t) for pid, t in workers.items()), "the worker to exit", timeout=30)


@pytest.mark.parametrize("group", [False, True], ids=["kill PID", "kill the group"])
def test_sigterm_stops_the_run_as_ctrl_c_does(tmp_path, start_paused, group):
    """SIGTERM (`kill PID`, a job scheduler, a shutdown) to the main process or to its whole process
    group: Ctrl-C's message, exit 143 (128 + SIGTERM's 15), the workers gone, no .tmp, and the same
    command again finishes the shards exactly."""
    data = write_jsonl(tmp_path / "d.jsonl", DOCS)
    out = tmp_path / "out"
    proc, flag = start_paused("fineweb.after_shard", "--data-files", data, "--out", out, "--shard-size", 1000)
    workers = children(proc.pid)
    (os.killpg if group else os.kill)(proc.pid, signal.SIGTERM)
    flag.unlink()
    proc.wait(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 143, err[-2000:]
    assert "fineweb.py: interrupted; finished shards are kept, re-run the same command to resume" in err
    assert "Traceback" not in err and not glob.glob(str(out / "*.tmp"))
    assert not any(alive(pid, t) for pid, t in workers.items())  # the pool was shut down, not abandoned
    assert len(json.load(open(out / "manifest.json"))["shards"]) == 1

    run("--data-files", data, "--out", out, "--shard-size", 1000)
    np.testing.assert_array_equal(np.concatenate(load_shards(out)), reference(DOCS))


def test_killed_between_a_shard_and_its_manifest_entry_resumes(tmp_path, start_paused):
    """SIGKILL right after the first shard file is renamed into place, before a manifest lists it:
    the same command again must work, and make the same bytes as a run that was never killed."""
    data = write_jsonl(tmp_path / "d.jsonl", DOCS)
    out = tmp_path / "out"
    proc, flag = start_paused("fineweb.before_manifest", "--data-files", data, "--out", out, "--shard-size", 1000)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=120)
    assert [os.path.basename(f) for f in shard_files(out)] == ["edufineweb_val_000000.npy"]
    assert json.load(open(out / "manifest.json"))["shards"] == []  # the shard is a leftover: rewritten

    run("--data-files", data, "--out", out, "--shard-size", 1000)
    run("--data-files", data, "--out", tmp_path / "ref", "--shard-size", 1000)
    assert read_bytes(out) == read_bytes(tmp_path / "ref")
    assert json.load(open(out / "manifest.json")) == json.load(open(tmp_path / "ref" / "manifest.json"))


# ---- bad input: exit 2, a message naming the problem, nothing written -------------------------------
def fails(capsys, *args):
    with pytest.raises(SystemExit) as e:
        run(*args)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("streaming", [False, True])
def test_no_text_column(tmp_path, capsys, streaming):
    data = write_jsonl(tmp_path / "d.jsonl", DOCS[:5], key="content")
    err = fails(capsys, "--data-files", data, "--out", tmp_path / "out", *(["--streaming"] * streaming))
    assert "no 'text' column" in err and "content" in err and "d.jsonl" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("streaming", [False, True])  # checked by a worker / by the main process
def test_text_that_is_not_a_string(tmp_path, capsys, streaming):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    err = fails(capsys, "--data-files", tmp_path / "d.jsonl", "--out", tmp_path / "out", *(["--streaming"] * streaming))
    assert "NoneType, not a string" in err and not (tmp_path / "out").exists()


def test_empty_dataset(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text("")
    err = fails(capsys, "--data-files", tmp_path / "d.jsonl", "--out", tmp_path / "out")
    assert "d.jsonl is empty" in err and not (tmp_path / "out").exists()
    # a dataset with no rows that `datasets` itself loads (the Hub path): same error from write_shards
    with pytest.raises(fineweb.DataError, match="empty"):
        fineweb.write_shards(datasets.Dataset.from_dict({"text": []}), "empty", {"shard_size": 10},
                             str(tmp_path / "out"), workers=1, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, content, message", [
    ("bad.parquet", b"not a parquet file at all", "Parquet magic bytes not found"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": oops\n', "JSON parse error"),
])
@pytest.mark.parametrize("streaming", [False, True])
def test_unreadable_file(tmp_path, capsys, name, content, message, streaming):
    (tmp_path / name).write_bytes(content)
    err = fails(capsys, "--data-files", tmp_path / name, "--out", tmp_path / "out", *(["--streaming"] * streaming))
    assert "could not read" in err and name in err and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad_line", [4, 1500], ids=["early", "late"])  # late: past the rows the main process
@pytest.mark.parametrize("streaming", [False, True])                       # samples, so a worker decodes it
def test_text_that_is_not_utf8(tmp_path, capsys, streaming, bad_line):
    """Latin-1 bytes in a .jsonl: an error naming the file and the line, exit 2, not a traceback."""
    good = write_jsonl(tmp_path / "a.jsonl", DOCS[:50])
    lines = [json.dumps({"text": f"document {i}"}).encode() for i in range(2000)]
    lines[bad_line - 1] = '{"text": "café, in Latin-1"}'.encode("latin-1")
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    err = fails(capsys, "--data-files", good, bad, "--out", tmp_path / "out", "--shard-size", 1000,
                *(["--streaming"] * streaming))
    assert f"--data-files {bad}, line {bad_line}: not valid UTF-8" in err
    for f in shard_files(tmp_path / "out"):  # whatever was finished before is intact
        np.load(f)


@pytest.mark.parametrize("streaming", [False, True])
def test_parquet_text_that_is_not_utf8(tmp_path, capsys, streaming):
    """Parquet has no lines to name: the message names the file."""
    texts = pa.array([b"fine", "café, in Latin-1".encode("latin-1")], type=pa.binary())
    pq.write_table(pa.table({"text": texts.cast(pa.string(), safe=False)}), tmp_path / "d.parquet")  # unchecked
    err = fails(capsys, "--data-files", tmp_path / "d.parquet", "--out", tmp_path / "out", *(["--streaming"] * streaming))
    assert f"--data-files {tmp_path / 'd.parquet'}: a document's text is not valid UTF-8" in err


def test_txt_file_that_is_not_utf8(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes("first line\nnaïve, in Latin-1\n".encode("latin-1"))
    err = fails(capsys, "--data-files", tmp_path / "a.txt", "--out", tmp_path / "out")
    assert f"--data-files {tmp_path / 'a.txt'}, line 2: not valid UTF-8" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("files, message", [
    (["missing.jsonl"], "'missing.jsonl': no such file"),
    (["*.parquet"], "no such file"),
    (["a.jsonl", "b.txt"], "one format"),
    (["a.csv"], "one format"),
])
def test_bad_data_files(tmp_path, capsys, monkeypatch, files, message):
    monkeypatch.chdir(tmp_path)
    for name in ("a.jsonl", "b.txt", "a.csv"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    assert message in fails(capsys, "--data-files", *files, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_from_different_settings(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", DOCS[:100])
    other = write_jsonl(tmp_path / "other.jsonl", DOCS[100:200])
    out = tmp_path / "out"
    run("--data-files", data, "--out", out, "--shard-size", 1000)
    before = read_bytes(out)
    err = fails(capsys, "--data-files", data, "--out", out, "--shard-size", 2000)
    assert f"--out {out}" in err and "shard_size=1000" in err and "2000" in err
    err = fails(capsys, "--data-files", other, "--out", out, "--shard-size", 1000)
    assert "data_files" in err and "other.jsonl" in err
    assert read_bytes(out) == before
    # shards with no manifest: written by something else, so never mixed with ours
    os.remove(out / "manifest.json")
    assert "no manifest.json" in fails(capsys, "--data-files", data, "--out", out, "--shard-size", 1000)
    assert read_bytes(out) == before


def test_data_file_rewritten_between_runs_is_not_resumed_into(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, DOCS[:100])
    out = tmp_path / "out"
    run("--data-files", data, "--out", out, "--shard-size", 1000, "--max-shards", 2)
    before = read_bytes(out)
    write_jsonl(data, DOCS[100:200])  # same name, other documents
    err = fails(capsys, "--data-files", data, "--out", out, "--shard-size", 1000)
    assert f"--out {out} holds shards made with data_files=" in err and "d.jsonl" in err
    assert read_bytes(out) == before


def test_out_that_is_a_file_fails_before_reading_data(tmp_path, capsys):
    (tmp_path / "notadir").write_text("mine")
    data = write_jsonl(tmp_path / "d.jsonl", DOCS[:5])
    err = fails(capsys, "--data-files", data, "--out", tmp_path / "notadir")
    assert f"--out {tmp_path / 'notadir'} is a file, not a directory" in err
    assert (tmp_path / "notadir").read_text() == "mine"


def test_a_killed_worker_stops_the_run_with_a_message_not_a_hang(tmp_path):
    """A tokenizer process killed mid-run (the out-of-memory killer does this) must end the run
    with exit 1 and a message, keeping the finished shards; multiprocessing.Pool would wait forever."""
    data = write_jsonl(tmp_path / "d.jsonl", DOCS)
    out = tmp_path / "out"
    # each worker starts normally, then its 3rd task kills it (os._exit: no clean-up, like SIGKILL)
    script = f"""
import os, sys
sys.path.insert(0, {ROOT!r})
import fineweb
real_init, real_work, calls = fineweb._init_worker, fineweb.tokenize_rows, [0]
def work(rows):
    calls[0] += 1
    if calls[0] == 3:
        os._exit(9)
    return real_work(rows)
def init(*args):
    real_init(*args)
    fineweb.tokenize_rows = work  # only inside the worker: tasks name the function, the worker looks it up
fineweb._init_worker = init
fineweb.TASK_CHARS = 2000
fineweb.main(["--data-files", {data!r}, "--out", {str(out)!r}, "--shard-size", "1000", "--workers", "2"])
"""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "a tokenizer process died" in proc.stderr and "re-run the same command to resume" in proc.stderr
    assert len(shard_files(out)) < len(reference(DOCS)) // 1000  # it stopped part-way
    run("--data-files", data, "--out", out, "--shard-size", 1000)  # the resumed run is exact
    np.testing.assert_array_equal(np.concatenate(load_shards(out)), reference(DOCS))


def test_no_tokenizer_offline_is_a_message(tmp_path):
    """With no network and no tiktoken cache: exit 2 naming TIKTOKEN_CACHE_DIR, not a traceback."""
    data = write_jsonl(tmp_path / "d.jsonl", DOCS[:5])
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update(TIKTOKEN_CACHE_DIR=str(tmp_path / "empty_cache"),  # no network, even if there is one:
               HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")  # a proxy that refuses
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "fineweb.py"), "--data-files", data, "--out",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "could not load tiktoken's 'gpt2' encoding" in proc.stderr and "TIKTOKEN_CACHE_DIR" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_name_defaults_to_sample_10bt_only_for_fineweb_edu():
    assert fineweb.parse_args([]).name == "sample-10BT"
    assert fineweb.parse_args(["--dataset", "someone/corpus"]).name is None
    assert fineweb.parse_args(["--dataset", "someone/corpus", "--name", "en"]).name == "en"


@pytest.mark.parametrize("flag", ["--shard-size", "--workers", "--max-shards"])
def test_flags_must_be_positive(capsys, flag):
    with pytest.raises(SystemExit) as e:
        fineweb.main(["--data-files", "x.jsonl", flag, "0"])
    assert e.value.code == 2 and f"{flag} must be at least 1" in capsys.readouterr().err


def test_benchmark_reports_both_worker_counts_and_leaves_out_alone(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", DOCS[:100])
    run("--data-files", data, "--out", tmp_path / "out", "--benchmark")
    printed = capsys.readouterr().out
    tokens = len(reference(DOCS[:100]))
    assert f"workers   1: {tokens:,} tokens" in printed and f"workers   2: {tokens:,} tokens" in printed
    assert not (tmp_path / "out").exists()


def test_shards_load_in_train_gpt2_loader(tmp_path):
    """train_gpt2.py finds fineweb.py's shards by name and reads them: one unshuffled epoch of its
    loader is exactly the train shards' tokens, the val loader starts with the val shard's."""
    import torch

    from train_gpt2 import DataLoader, data_sources

    out = str(tmp_path / "shards")
    run("--data-files", write_jsonl(tmp_path / "docs.jsonl", DOCS), "--out", out, "--shard-size", 5000)
    arrays = load_shards(out)
    train, val = data_sources(out)
    assert [os.path.basename(f) for f in val] == ["edufineweb_val_000000.npy"]
    assert len(train) == len(arrays) - 1 >= 2
    B, T = 2, 32
    loader = DataLoader(train, B, T, shuffle=False)
    expected = np.concatenate(arrays[1:])
    seen = [loader.next_batch()[0] for _ in range((len(expected) - 1) // (B * T))]
    got = torch.cat([x.flatten() for x in seen]).numpy()
    assert np.array_equal(got, expected[: len(got)].astype(np.int64))
    x, y = DataLoader(val, B, T, shuffle=False).next_batch()
    assert np.array_equal(x.flatten().numpy(), arrays[0][: B * T]) and np.array_equal(y.flatten().numpy(), arrays[0][1 : B * T + 1])
