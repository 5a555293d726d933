"""Find a saved adapter's files in a local folder or in a Hugging Face Hub repo (through the hub cache).

One helper for every reader, so that a hub repo id works wherever a folder does:
``AdaptiveLoraConfig.from_pretrained`` and the ``inspect``/``plot``/``export`` readers. A hub file is fetched
with ``huggingface_hub.hf_hub_download``, which keeps it in the hub cache (``HF_HUB_CACHE``) and, offline
(``HF_HUB_OFFLINE=1``), finds it there. The download options are ``hf_hub_download``'s own (``revision``,
``cache_dir``, ``token``, ``local_files_only``, ...), split off the other keyword arguments the way PEFT's
``PeftConfig.from_pretrained`` does.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from huggingface_hub import _CACHED_NO_EXIST, hf_hub_download, try_to_load_from_cache
from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

#: Keyword arguments passed through to ``hf_hub_download`` (the repo, file name and subfolder are set here).
HUB_DOWNLOAD_KWARGS = frozenset(inspect.signature(hf_hub_download).parameters) - {"repo_id", "filename", "subfolder"}


def split_hub_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(download options for hf_hub_download, everything else)``."""
    hub = {k: v for k, v in kwargs.items() if k in HUB_DOWNLOAD_KWARGS}
    return hub, {k: v for k, v in kwargs.items() if k not in hub}


def is_local_path(name: str | os.PathLike) -> bool:
    """True unless ``name`` can be a hub id (``org/name`` or ``name``) that is not a local file or folder."""
    name = os.fspath(name)
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or os.sep != "/"
        and os.sep in name
        or os.path.exists(name)
    )


def is_hub_id(path: str | os.PathLike) -> bool:
    """True when ``path`` is read from the hub: it is no local file or folder and looks like a repo id."""
    return not is_local_path(path)


def fetch_adapter_file(
    path_or_repo_id: str | os.PathLike, filename: str, subfolder: str | None = None, **hub_kwargs: Any
) -> str | None:
    """Local path of ``filename`` of the adapter at ``path_or_repo_id``; None when it has no such file.

    A local folder is read in place (``hub_kwargs`` are ignored). For a hub repo id the file is downloaded
    into the hub cache (offline: looked up there) with ``hf_hub_download(..., **hub_kwargs)``. None means the
    hub said the repo has no such file, now or in an earlier look-up recorded in the cache. Anything that
    stops the question being answered (no such repo, no access, offline and not cached) raises the hub
    client's error (an ``OSError`` or ``ValueError`` subclass).
    """
    if not is_hub_id(path_or_repo_id):
        file = os.path.join(path_or_repo_id, subfolder or "", filename)
        return file if os.path.isfile(file) else None
    repo_id = os.fspath(path_or_repo_id)
    try:
        return hf_hub_download(repo_id, filename, subfolder=subfolder or None, **hub_kwargs)
    except EntryNotFoundError as exc:
        if not isinstance(exc, LocalEntryNotFoundError):
            return None  # the hub answered: no such file in the repo
        cached = try_to_load_from_cache(
            repo_id,
            f"{subfolder}/{filename}" if subfolder else filename,
            cache_dir=hub_kwargs.get("cache_dir"),
            revision=hub_kwargs.get("revision"),
            repo_type=hub_kwargs.get("repo_type"),
        )
        if cached is _CACHED_NO_EXIST:
            return None  # an earlier online look-up found no such file at this revision
        raise
