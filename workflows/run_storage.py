"""Where a training job keeps its checkpoints: Ray Train's storage, OUT/ray by default, or any
pyarrow filesystem URI given as `--storage` (`s3://bucket/prefix`, `gs://bucket/prefix`, a local
path). Credentials and endpoints come from the environment, as pyarrow reads them (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL).

    STORAGE/<run>/                   one Ray Train run per job (`workflows/train.py`, `job_name`)
    STORAGE/<run>/<stage>_step_<N>/  a checkpoint (bubogpt/checkpoints/training_state.py layout)

Every read of a checkpoint goes through the storage's filesystem (`RunStorage`): listing the complete
checkpoints, reading their state, and `local_copy` for what needs files on disk (loading a model).
A location is a local path or a URI; `RunStorage.uri` gives a folder's location back in that form
(what OUT/stages.json records).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from bubogpt.checkpoints.training_state import STATE_FILE, TrainState, listing_is_complete


class StorageError(ValueError):
    """A storage location that cannot be used (unknown scheme, unreachable, not a checkpoint)."""


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def open_location(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path (made absolute) or a filesystem URI."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    try:
        filesystem, path = pafs.FileSystem.from_uri(str(location))
    except (pa.ArrowInvalid, OSError) as err:
        raise StorageError(f"{location}: not a usable storage URI: {err}") from err
    return filesystem, path.rstrip("/")


class RunStorage:
    """A storage root (local path or URI) and its filesystem."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        self.filesystem, self.root = open_location(location)
        self.scheme = self.location.split("://", 1)[0] if is_uri(location) else None

    def path(self, *parts: str) -> str:
        """A path inside the filesystem, under the root."""
        return "/".join([self.root, *parts])

    def uri(self, path: str) -> str:
        """A path inside the filesystem as a location (local path or URI)."""
        return path if self.scheme is None else f"{self.scheme}://{path}"

    def files(self, folder: str) -> dict[str, int]:
        """{relative path: size} of every file under `folder` (empty when it does not exist)."""
        selector = pafs.FileSelector(folder, recursive=True, allow_not_found=True)
        return {
            info.path[len(folder) + 1 :]: info.size
            for info in self.filesystem.get_file_info(selector)
            if info.type == pafs.FileType.File
        }

    def read_text(self, path: str) -> str:
        with self.filesystem.open_input_stream(path) as stream:
            return stream.read().decode("utf-8")

    def read_state(self, checkpoint: str) -> TrainState:
        """The state of a checkpoint folder (a path inside the filesystem)."""
        return TrainState.from_json(self.read_text(f"{checkpoint}/{STATE_FILE}"))

    def complete_state(self, checkpoint: str) -> TrainState | None:
        """The checkpoint's state when every file it lists arrived in storage, else None."""
        try:
            state = self.read_state(checkpoint)
        except (OSError, ValueError, KeyError):
            return None
        return state if listing_is_complete(state, self.files(checkpoint)) else None

    def runs(self) -> list[str]:
        """The run folders under the root."""
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        return sorted(i.base_name for i in self.filesystem.get_file_info(selector) if i.type == pafs.FileType.Directory)

    def checkpoints(self, run: str) -> dict[str, list[tuple[int, str]]]:
        """The complete checkpoints of a run: {stage: [(step, path)] by step}."""
        found: dict[str, list[tuple[int, str]]] = {}
        selector = pafs.FileSelector(self.path(run), allow_not_found=True)
        for info in self.filesystem.get_file_info(selector):
            if info.type != pafs.FileType.Directory or info.base_name.startswith("."):
                continue
            state = self.complete_state(info.path)
            if state is not None:
                found.setdefault(state.stage, []).append((state.step, info.path))
        return {stage: sorted(items) for stage, items in found.items()}

    @contextmanager
    def local_copy(self, path: str) -> Iterator[Path]:
        """A folder of this storage on local disk: itself when the storage is local, else a
        temporary download, deleted afterwards."""
        if self.scheme is None:
            yield Path(path)
            return
        scratch = Path(tempfile.mkdtemp(prefix="bubogpt-storage-"))
        try:
            target = scratch / Path(path).name
            pafs.copy_files(path, str(target), source_filesystem=self.filesystem,
                            destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
            yield target
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def local_folder(location: str | Path) -> Iterator[Path]:
    """A folder given as a local path or URI, on local disk (see `RunStorage.local_copy`)."""
    storage = RunStorage(location)
    with storage.local_copy(storage.root) as folder:
        yield folder

