"""Upload an adapter folder to the Hugging Face Hub through ``huggingface_hub``.

Thin on purpose: it checks the folder (`load_adapter`), creates the repository if needed and
uploads the adapter's files, nothing else. It cannot be tested without a reachable Hub; the test
suite only checks which files it hands to ``HfApi.upload_folder``.
"""

from __future__ import annotations

import os

from gallop_kernels.adapter.folder import ADAPTER_FILES, load_adapter


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload GaLLoP sparse delta",
) -> str:
    """Upload the adapter in ``folder`` to the model repository ``repo_id``; returns the commit URL."""
    load_adapter(folder)  # a broken folder is refused before anything is uploaded
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    files = [name for name in ADAPTER_FILES if os.path.isfile(os.path.join(os.fspath(folder), name))]
    commit = api.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), allow_patterns=files,
                               commit_message=commit_message, revision=revision, repo_type="model")
    return str(getattr(commit, "commit_url", commit))
