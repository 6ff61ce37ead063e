"""Files that outlive a node: copies between this node's disk and a storage URI (a path, s3://, gs://, ...).

pyarrow's filesystems (what Ray Train and Tune write checkpoints with) read credentials and an endpoint
override (AWS_ENDPOINT_URL) from the environment, which the sweep passes to every process of its cluster.
Files fetched from storage are cached once per node (`cached`), not once per trial.
"""

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in uri


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts]) if is_remote(uri) else os.path.join(uri, *parts)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI or a local path."""
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def upload(local: str | Path, uri: str) -> None:
    """Copy a local file or folder (recursively, replacing files of the same name) to `uri`."""
    fs, path = filesystem(uri)
    local = os.path.abspath(local)
    if os.path.isdir(local):
        fs.create_dir(path, recursive=True)
    else:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def touch(uri: str) -> None:
    """An empty file at `uri` (a marker)."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path):
        pass


def download(uri: str, local: str | Path) -> bool:
    """Copy a file or folder at `uri` to `local`; False if there is nothing at `uri`."""
    fs, path = filesystem(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        return False
    (Path(local) if kind == pafs.FileType.Directory else Path(local).parent).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return True


def cache_root() -> Path:
    """This node's cache of files fetched from storage; shared by every trial and worker on the node."""
    return Path(os.environ.get("PALP_CACHE", Path(tempfile.gettempdir()) / "palp-sweep-cache"))


def cached(uri: str) -> Path:
    """A local copy of the file or folder at `uri`, fetched once per node: the first process to ask fetches it
    (under a lock) and the others on the node wait for it and reuse it. Storage paths are never rewritten in
    place (a sweep writes new content under a new name), so a finished copy stays valid."""
    name = Path(uri.rstrip("/")).name
    home = cache_root() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    target, done = home / name, home / ".complete"
    if done.exists():
        return target
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            if not download(uri, target):
                raise FileNotFoundError(f"{uri}: not found in storage")
            done.touch()
    return target


def read_text(uri: str) -> str | None:
    """A small text file's contents (local path or storage URI); None when there is none."""
    if not exists(uri):
        return None
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())
