"""Atomic writes: readers see the old file or the new one, never half of one."""
import os
import tempfile


def _read_umask():
    """The process's umask. Reading it means setting it, which races with other threads' file
    creation: done once, at import, before any request thread exists."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()


def write_bytes(path, data, durable=True):
    """Write `data` to `path` through a temp file in the same directory and a rename.

    `durable` also flushes to disk before the rename (survives power loss); caches,
    which are checked on read and recomputed when bad, can skip that cost.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; readers may be other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text(path, text):
    write_bytes(path, text.encode("utf-8"))
