"""Hugging Face hub caches laid out on disk, for offline hub-id tests.

huggingface_hub keeps a repository as ``<cache>/<type>s--<org>--<name>/``
with ``blobs/<sha256>`` (the files' bytes), ``snapshots/<commit>/<path>``
(symlinks into ``blobs``) and ``refs/<branch>`` (the commit a branch points
to). :func:`add_to_cache` writes exactly that, so with ``HF_HUB_OFFLINE=1``
and ``HF_HUB_CACHE`` pointing at ``cache`` the libraries resolve the id as
they would after a real download.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_to_cache(cache: Path, repo_id: str, source: Path, *, repo_type: str = "model", branch: str = "main",
                 commit: str | None = None) -> str:
    """Put every file under ``source`` in ``cache`` as ``repo_id`` at ``branch``; returns the commit hash."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    if commit is None:
        digest = hashlib.sha1(repo_id.encode())
        for path in files:
            digest.update(str(path.relative_to(source)).encode() + path.read_bytes())
        commit = digest.hexdigest()
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    for path in files:
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return commit
