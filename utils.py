"""Three small things the scripts share: one way to download a file, one way to write a file so
that a crash never leaves half of it under the real name, and a pause point for tests."""
import errno
import http.client
import os
import shutil
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
