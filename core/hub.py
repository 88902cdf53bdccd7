"""Hugging Face hub ids: fetching a snapshot into huggingface_hub's cache, and knowing one when it is seen.

Everything that loads a model or a dataset by id goes through
:func:`snapshot`, which returns a local directory; the rest of molting then
reads that directory as it reads any other. A snapshot's directory says
where it came from (``.../models--ORG--NAME/snapshots/COMMIT``), so
:func:`hub_origin` recovers the id and the resolved commit for the run
record and the model card without carrying them alongside the path.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from molting.errors import MoltingError


@attrs.frozen
class HubOrigin:
    """Where a directory came from, when it is a snapshot in huggingface_hub's cache."""

    repo_id: str
    commit: str

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.commit[:12]}"


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is a valid hub repository id (``NAME`` or ``ORG/NAME``) rather than a path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.startswith((".", "~")) and name.count("/") <= 1


def snapshot(repo_id: str, revision: str | None, patterns: list[str] | None, what: str, kind: str,
             error: type[MoltingError]) -> str:
    """The local directory of ``repo_id`` (``kind`` ``"model"`` or ``"dataset"``) at ``revision``.

    Fetched into, or found in, huggingface_hub's cache by ``snapshot_download``
    (with its progress bars; ``HF_TOKEN`` and ``hf auth login`` as
    huggingface_hub reads them); only the files matching ``patterns``. Its
    errors become one ``error`` line naming ``what``, the id and the fix.
    """
    from huggingface_hub import errors, snapshot_download

    where = f"{what} {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    page = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
    try:
        return snapshot_download(repo_id, repo_type=kind, revision=revision, allow_patterns=patterns)
    except errors.GatedRepoError as exc:
        raise error(f"{where} is gated on the Hugging Face hub: accept its terms on {page} and log in "
                    "(hf auth login, or set HF_TOKEN)") from exc
    except errors.RepositoryNotFoundError as exc:
        raise error(f"{where}: no such {kind} on the Hugging Face hub, or it is private (check the id; for a private "
                    "one log in with hf auth login, or set HF_TOKEN)") from exc
    except errors.RevisionNotFoundError as exc:
        raise error(f"{where}: the {kind} has no such revision (give a branch, tag or commit hash)") from exc
    except errors.LocalEntryNotFoundError as exc:
        fetch = (f"hf download {'--repo-type dataset ' if kind == 'dataset' else ''}{repo_id}"
                 + (f" --revision {revision}" if revision else ""))
        raise error(f"{where} is not in the Hugging Face cache ({_cache_dir()}) and the hub cannot be reached "
                    f"(HF_HUB_OFFLINE=1, or no network): fetch it once online ({fetch}), or unset HF_HUB_OFFLINE"
                    ) from exc
    except (errors.HfHubHTTPError, OSError) as exc:
        raise error(f"{where}: cannot fetch it from the Hugging Face hub: {str(exc).splitlines()[0]}") from exc


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_origin(path: str | Path) -> HubOrigin | None:
    """The hub id and commit of a directory laid out as a snapshot in huggingface_hub's cache
    (``.../models--ORG--NAME/snapshots/COMMIT``, or ``datasets--``), else ``None``."""
    path = Path(path)
    repo = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo.startswith(("models--", "datasets--")):
        return None
    return HubOrigin(repo.split("--", 1)[1].replace("--", "/"), path.name)
