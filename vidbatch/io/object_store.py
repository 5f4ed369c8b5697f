"""Inputs and outputs in object storage (`s3://`, `gs://`, any fsspec URL) through fsspec.

Inputs: `open_input` opens the object as a stream that WebDataset's tar reader consumes, never the
whole object in memory. Credentials and endpoints come from the store's standard environment
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ..., `GOOGLE_APPLICATION_CREDENTIALS`), read by the store's
own library (botocore for s3fs).

Outputs: a run whose `--output` is a URL works in a node-local staging folder (`staging_dir`: a
folder named by the URL's hash under `$VIDBATCH_STAGING`, else under `vidbatch-staging` in the node's
local folder, `core.local_dir`: $VIDBATCH_LOCAL_DIR, $SLURM_TMPDIR, $TMPDIR or /tmp) that
holds what a local output folder holds, and is bound to the URL by `STORE_FILE` in it (so workers that
only get the folder, Ray actors included, commit to the same store). A shard is written there exactly as a local output, then
committed to the store by `commit_shard`:

1. the store's old done marker is deleted (a redone shard is never "done" with new data under an old
   marker, even if this attempt dies before its own marker);
2. the tar is uploaded, then the stats jsonl (each upload is one object PUT: a reader sees the old
   object or the whole new one, never a part);
3. the done marker is written last, with a conditional put (`If-None-Match: *`) where the store has
   one: a marker that appeared meanwhile means another attempt committed the shard, and this one
   raises `core.faults.LeaseLost` (the same "lost the shard" the local lease fence raises). A store
   without a conditional put gets a plain put.

A kill anywhere before step 3 leaves no marker: the shard is not done and the next run redoes it, so
no sample is ever visible twice or half-written under a done marker. The staging folder then keeps a
copy of the marker and jsonl (small: the summary and resume read them) and a receipt of the tar's size
(`receipt_sizes`); the tar itself is deleted from the staging folder once uploaded.

Resume: `sync_from_store` lists the output prefix once at the start of a run and mirrors the store's
markers, jsonls and tar sizes into the staging folder, so the ordinary checks (`io.shard_check`) decide
from the store's truth which shards are done, on any machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import fsspec

from vidbatch.core.atomic import atomic_write
from vidbatch.core.faults import LeaseLost
from vidbatch.core.local_dir import local_dir

STAGING_ENV = "VIDBATCH_STAGING"
# In a staging folder: the URL of the output it stages for (`{"url": ...}`).
STORE_FILE = ".store.json"
# In a staging folder: per committed shard, the sizes of the files that live only in the store.
RECEIPTS_DIR = ".store-receipts"
# Test-only fault hook: the process exits at once (as if killed) after uploading this shard's tar and
# jsonl, before its marker. Unset in every real run.
TEST_KILL_ENV = "VIDBATCH_TEST_KILL_AFTER_UPLOAD"
TEST_KILL_EXIT = 137
# The run's own files, uploaded by `upload_run_files` when a run ends (shards are uploaded as committed).
RUN_FILES = ("config.yaml", "plan.json", "summary.json", "report.html", "run.log")
RUN_FOLDERS = ("report_media",)


def open_input(url: str) -> BinaryIO:
    """A readable binary stream of the object at `url` (read sequentially, block by block)."""
    return fsspec.open(url, "rb").open()


def staging_dir(url: str) -> Path:
    """The node-local folder a run writing to `url` works in: `<16 hex digits of the URL's sha256>` under
    `$VIDBATCH_STAGING` when set, else under `vidbatch-staging` in the node's local folder (`core.local_dir`
    from the environment: the driver stages before any worker exists). One folder per URL: two outputs never
    share leases, failure records or staged markers."""
    configured = os.environ.get(STAGING_ENV, "").strip()
    parent = Path(configured).expanduser() if configured else local_dir() / "vidbatch-staging"
    return parent / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


class ObjectStore:
    """The output prefix `url` in an fsspec filesystem; names are relative to it, with `/`."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def listing(self) -> dict[str, int]:
        """Every object under the prefix: relative name -> size in bytes. One listing call."""
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        sizes = {}
        for path, info in found.items():
            name = path[len(self.root) + 1:] if path.startswith(self.root + "/") else None
            if name and info.get("type", "file") == "file":
                sizes[name] = int(info.get("size") or 0)
        return sizes

    def read_many(self, names: list[str]) -> dict[str, bytes]:
        """The contents of several objects, fetched concurrently where the store allows; missing ones left out."""
        if not names:
            return {}
        paths = [self.path(n) for n in names]
        data = self.fs.cat(paths, on_error="omit")   # keyed by the paths as given (no protocol, like `root`)
        return {name: data[path] for name, path in zip(names, paths) if path in data}

    def download(self, name: str, local: Path) -> None:
        self.fs.get_file(self.path(name), str(local))

    def upload(self, local: Path, name: str) -> None:
        self.fs.put_file(str(local), self.path(name))

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass

    def put_new(self, name: str, data: bytes) -> None:
        """Writes `data` under `name` only if nothing is there (`If-None-Match: *` where the store has a
        conditional put); FileExistsError when something is."""
        try:
            self.fs.pipe_file(self.path(name), data, mode="create")
        except TypeError:   # an older filesystem without `mode`: a plain put
            self.fs.pipe_file(self.path(name), data)


def bind_staging(staging: Path, url: str) -> None:
    """Marks `staging` as the staging folder of the output `url` (see `store_of`)."""
    staging.mkdir(parents=True, exist_ok=True)
    atomic_write(staging / STORE_FILE, json.dumps({"url": url.rstrip("/")}))


def store_of(out_dir: str | Path) -> ObjectStore | None:
    """The object store a staging folder commits to; None for an ordinary local output folder."""
    path = Path(out_dir) / STORE_FILE
    if not path.is_file():
        return None
    return ObjectStore(json.loads(path.read_text())["url"])


def receipt_path(out_dir: Path, stem: str) -> Path:
    return Path(out_dir) / RECEIPTS_DIR / f"{stem}.json"


def receipt_sizes(out_dir: Path, stem: str) -> dict[str, int]:
    """For a staging folder: the files of shard `stem` that live only in the store -> their sizes there
    (as listed at the start of the run, or as uploaded); {} for a local output."""
    path = receipt_path(out_dir, stem)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}


def commit_shard(out_dir: Path, store: ObjectStore, stem: str, uploads: list[tuple[Path, str]],
                 marker_name: str, marker: dict[str, Any], store_only: tuple[str, ...] = ()) -> None:
    """Commits a staged shard to `store`: old marker deleted, `uploads` (local file, relative name) put in
    order, then the marker with a conditional put (see the module docstring). Raises LeaseLost when the
    marker already exists (another attempt committed the shard meanwhile); the caller publishes the
    local copies only after this returns. `store_only`: the uploaded names the caller does not keep in
    the staging folder; their sizes go into the shard's receipt."""
    store.delete(marker_name)
    for local, name in uploads:
        store.upload(local, name)
    if os.environ.get(TEST_KILL_ENV) == stem:
        os._exit(TEST_KILL_EXIT)
    try:
        store.put_new(marker_name, json.dumps(marker, indent=2).encode())
    except FileExistsError:
        raise LeaseLost(f"shard {stem}: a done marker appeared in {store.url} while this attempt uploaded "
                        "(another driver committed it); this attempt's upload is superseded") from None
    sizes = {name: local.stat().st_size for local, name in uploads if name in store_only}
    receipt = receipt_path(out_dir, stem)
    receipt.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(receipt, json.dumps(sizes))


def sync_from_store(out_dir: Path, store: ObjectStore, stems: list[str] | None = None) -> None:
    """Mirrors the store's done shards into the staging folder `out_dir`, from one listing of the prefix:
    each marker (downloaded), its jsonl (downloaded unless the staged copy has the marker's sha256) and
    a receipt of the tar's listed size. Staged markers the store does not have are removed, so the
    staging folder never claims a shard the store lacks. `stems`: only those shards (default: all)."""
    listing = store.listing()
    stats = Path(out_dir) / "stats"
    stats.mkdir(parents=True, exist_ok=True)
    remote_stems = {name[len("stats/"):-len(".json")] for name in listing
                    if name.startswith("stats/") and name.endswith(".json") and name.count("/") == 1}
    wanted = set(stems) if stems is not None else None
    for local_marker in stats.glob("*.json"):
        stem = local_marker.stem
        if stem not in remote_stems and (wanted is None or stem in wanted):
            local_marker.unlink(missing_ok=True)
            receipt_path(out_dir, stem).unlink(missing_ok=True)
    todo = sorted(s for s in remote_stems if wanted is None or s in wanted)
    markers = store.read_many([f"stats/{s}.json" for s in todo])
    for stem in todo:
        text = markers.get(f"stats/{stem}.json")
        if text is None:
            continue
        rows_name, tar_name = f"stats/{stem}.jsonl", f"shards/{stem}.tar"
        rows_local = stats / f"{stem}.jsonl"
        if rows_name in listing and not _staged_copy_matches(rows_local, text, rows_name, listing[rows_name]):
            tmp = rows_local.with_name(f".{rows_local.name}.sync.tmp")
            store.download(rows_name, tmp)
            os.replace(tmp, rows_local)
        elif rows_name not in listing:
            rows_local.unlink(missing_ok=True)
        sizes = {tar_name: listing[tar_name]} if tar_name in listing else {}
        receipt = receipt_path(out_dir, stem)
        receipt.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(receipt, json.dumps(sizes))
        atomic_write(stats / f"{stem}.json", text.decode("utf-8", errors="replace"))   # last, as in a commit


def _staged_copy_matches(local: Path, marker_text: bytes, name: str, size: int) -> bool:
    """Whether the staged `local` file is the one the store's marker records (size and sha256)."""
    if not local.is_file() or local.stat().st_size != size:
        return False
    try:
        record = json.loads(marker_text).get("files", {}).get(name, {})
    except (ValueError, AttributeError):
        return False
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    return isinstance(record, dict) and record.get("sha256") == digest


def upload_run_files(out_dir: Path, store: ObjectStore, names: tuple[str, ...] = RUN_FILES) -> None:
    """Uploads the run's own files (summary, report, config, plan, log) that exist in the staging folder."""
    out_dir = Path(out_dir)
    for name in names:
        if (out_dir / name).is_file():
            store.upload(out_dir / name, name)
    for folder in RUN_FOLDERS:
        for path in sorted((out_dir / folder).rglob("*")) if (out_dir / folder).is_dir() else []:
            if path.is_file() and not path.name.startswith("."):
                store.upload(path, path.relative_to(out_dir).as_posix())
