"""Small things the scripts share: one way to download a file, one way to write a file so that a
crash never leaves half of it under the real name, a pause point for tests, the --device a script
runs on, the autocast dtype that --dtype auto means there (bfloat16 on a CPU only where it is
native), and glibc's allocator told to keep the memory a CPU run frees."""
import errno
import functools
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from tqdm import tqdm


def download(url, path, timeout=60):
    """Download url to path with a progress bar. The file appears under its name only when it is
    complete: a dropped connection (fewer bytes than Content-Length), Ctrl-C or an error leaves
    nothing behind. Raises OSError (urllib's own errors are OSErrors)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # a unique temporary name: ranks that download at once never write into each other's file
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(path)}") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            if size is not None and bar.n != size:  # a dropped connection ends read() early, silently
                raise OSError(f"{url}: the connection closed after {bar.n:,} of {size:,} bytes")
        os.replace(tmp, path)
    except http.client.HTTPException as e:  # not an OSError, unlike urllib's own errors
        raise OSError(f"{url}: {type(e).__name__}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write(path, write, size_hint=None):
    """Call write(f) on a file opened at path + ".tmp", flush it to disk, then rename it to path:
    a crash at any moment leaves either the old file or the complete new one, never a partial one.
    On any error the temporary file is removed. A full disk raises OSError(ENOSPC) whose message
    names the directory and the space needed (size_hint, bytes, is checked before writing too)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = path + ".tmp"
    if size_hint is not None and shutil.disk_usage(directory).free < size_hint:
        raise _disk_full(directory, path, size_hint)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a machine crash cannot leave a truncated file
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        if isinstance(e, Exception) and _is_disk_full(e):
            raise _disk_full(directory, path, size_hint) from e
        raise


def _is_disk_full(error):
    # torch.save reports a full disk as a RuntimeError from its zip writer; the OSError with
    # errno ENOSPC is further down the chain (its __context__)
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _disk_full(directory, path, size_hint):
    free = shutil.disk_usage(directory).free
    need = f"about {size_hint / 1e6:,.1f} MB" if size_hint else "more space"
    return OSError(errno.ENOSPC, f"no space left on device in {directory}: writing {os.path.basename(path)} "
                                 f"needs {need}, {free / 1e6:,.1f} MB are free. Free some space (older files "
                                 "there were left intact) and run the same command again")


def pause_point(name):
    """For tests that must kill or signal a program at an exact moment, never at a lucky one: when
    the environment variable GPT2_PAUSE_AT equals name, create the file GPT2_PAUSE_FILE and wait
    while it exists. The test waits for the file, does its kill or signal, and deletes the file to
    let the program go on. Does nothing otherwise (one dictionary lookup)."""
    if os.environ.get("GPT2_PAUSE_AT") != name:
        return
    flag = os.environ["GPT2_PAUSE_FILE"]
    with open(flag, "w") as f:
        f.write(str(os.getpid()))
    while os.path.exists(flag):
        time.sleep(0.01)


def usable_device(name):
    """--device name, or for "auto" the best device here (cuda, else mps, else cpu); a ValueError if
    this machine cannot use it."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        torch.empty(0, device=name)  # an absent or misspelt device fails here, with a clear message
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ValueError(f"--device {name}: not usable on this machine ({str(e).splitlines()[0]})") from None
    return name


# ---------------------------------------------------------------- bfloat16 on the CPU
# A CPU with bfloat16 instructions (x86: AVX512-BF16 or AMX; ARM: FEAT_BF16) multiplies bfloat16
# matrices about twice as fast as float32 ones: training steps there run ~1.9x faster under
# autocast. Without them, bfloat16 is emulated and slower than float32. So "--dtype auto" asks.

CPU_BF16_ENV = "GPT2_CPU_BF16"  # "1" or "0": override the detection (for tests, or a CPU it gets wrong)


def cpu_has_fast_bf16():
    """Whether this CPU has native bfloat16 matrix multiplication. The environment variable
    GPT2_CPU_BF16=1/0 decides if set; else what the OS reports (cached); else, when the OS gives no
    answer, a one-off measurement of a bfloat16 against a float32 matmul (a few milliseconds)."""
    override = os.environ.get(CPU_BF16_ENV, "")
    if override:
        if override not in ("0", "1"):
            raise ValueError(f"{CPU_BF16_ENV}={override!r}: expected 1 (this CPU has fast bfloat16) or 0 (it "
                             "has not), or leave it unset to detect it")
        return override == "1"
    return _detected_cpu_bf16()


@functools.cache  # the hardware does not change while we run
def _detected_cpu_bf16():
    answer = cpu_bf16_from_os()
    return _bf16_matmul_is_faster() if answer is None else answer


def cpu_bf16_from_os():
    """True or False as the OS reports the CPU's bfloat16 support, or None if it does not say."""
    if sys.platform == "darwin":  # Apple silicon; Intel Macs have no such key (and no AVX512-BF16)
        try:
            result = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                    timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() == "1" if result.returncode == 0 else None
    try:
        with open("/proc/cpuinfo") as f:
            return bf16_from_cpuinfo(f.read())
    except OSError:  # not Linux (Windows, BSD): measure instead
        return None


def bf16_from_cpuinfo(text):
    """Linux's /proc/cpuinfo: x86 lists its features on "flags" lines, aarch64 on "Features" lines.
    True if the first such line has a bfloat16 matmul feature, False if it has none, None if no line."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, features = key.strip(), set(value.split())
        if key == "flags":  # x86: AVX512-BF16 (Cooper Lake, Zen 4 and later) or AMX (Sapphire Rapids and later)
            return bool(features & {"avx512_bf16", "amx_bf16"})
        if key == "Features":  # aarch64: FEAT_BF16 (e.g. Graviton 3, Neoverse V1/N2, Apple M2)
            return "bf16" in features
    return None


def _bf16_matmul_is_faster(n=256, repeats=5):
    """The fallback: is a bfloat16 (n, n) matmul faster than a float32 one here? Best of a few
    alternating runs, so that a busy machine slows both alike. Emulated bfloat16 is several times
    slower than float32, native about twice as fast: the answer is rarely close."""
    import torch

    a = torch.randn(n, n)
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    operands = {dtype: (a.to(dtype), a.to(dtype)) for dtype in best}
    for _ in range(repeats):
        for dtype, (x, y) in operands.items():
            t0 = time.perf_counter()
            x @ y
            best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[torch.bfloat16] < best[torch.float32]


def autocast_dtype(device_type, choice="auto"):
    """The autocast dtype for --dtype auto|float32|bfloat16|float16 on a device type ("cuda", "cpu",
    "mps"); None means plain float32. auto is bfloat16 on CUDA and on a CPU with native bfloat16
    (cpu_has_fast_bf16), float32 elsewhere. An explicit choice is always taken as it is."""
    if choice == "auto":
        if device_type == "cuda" or (device_type == "cpu" and cpu_has_fast_bf16()):
            choice = "bfloat16"
        else:
            choice = "float32"
    if choice not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {choice}: choose auto, float32, bfloat16 or float16")
    import torch

    return None if choice == "float32" else getattr(torch, choice)


# ---------------------------------------------------------------- the CPU allocator
# glibc's malloc hands every freed block over 32 MB straight back to the OS, and the next step
# page-faults it back in, zero-filled by the kernel. On a CPU the logits and their gradient
# (B x T x 50304 floats: 51 MB at B x T = 256) are such blocks, several times a step: the demo spent
# as much time in the kernel as in its matmuls (BENCHMARKS.md). Keeping freed memory in the process,
# as PyTorch's CUDA caching allocator does on a GPU, halves its step time.

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def keep_freed_memory(limit=1 << 30):
    """Ask glibc to serve blocks up to `limit` bytes from its heap and not to give freed memory back
    to the OS (the process's memory then stays near its peak, which it reaches every step anyway).
    Process-wide and for good: call it from a script's entry point, not from library code. Returns
    whether it applied: False off glibc (macOS, Windows, musl), which manage memory their own way."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(M_TRIM_THRESHOLD, limit))
    except (OSError, AttributeError):
        return False
