"""``--push_to_hub REPO``: upload a saved ``model/`` (with its card) to the Hugging Face Hub.

Credentials are checked before any work (:func:`check_push`), so a missing token fails in
a second with nothing written instead of after the run.
"""

from pathlib import Path

from lightning_prune.errors import InputError

__all__ = ["check_push", "push_model"]


def check_push(repo: str | None) -> None:
    """A well-formed ``owner/name`` (or ``name``) repo id and a Hub token; nothing to check for ``None``."""
    if repo is None:
        return
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as error:
        raise InputError(f"--push_to_hub {repo!r} is not a Hub repo id such as user/model-pruned") from error
    if get_token() is None:
        raise InputError(f"--push_to_hub {repo!r} needs Hub credentials: set HF_TOKEN or run `hf auth login`")


def push_model(directory: str | Path, repo: str, message: str = "Upload model from lightning-prune") -> str:
    """Create ``repo`` if needed (a model repo) and upload ``directory``; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, repo_type="model", exist_ok=True)
    info = api.upload_folder(repo_id=repo, folder_path=str(directory), repo_type="model", commit_message=message)
    return str(info.commit_url)
