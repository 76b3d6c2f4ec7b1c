"""Publishing an export on the Hugging Face Hub with huggingface_hub's `HfApi`.

`push_to_hub` runs three steps:

1. `prepare_upload` checks everything that can be checked without a request: the repository id
   (huggingface_hub's `validate_repo_id`), that the directory is a complete tbquant export that
   loads, and the option combination. It lists the files and renders the model card again
   (`render_model_card`), with the repository id in the usage example.
2. `resolve_token` takes the token from the argument, else from huggingface_hub's `get_token`
   (the `HF_TOKEN` variable, then the stored login of `hf auth login`).
3. `upload` creates the repository if needed (and the branch for a revision), then uploads
   every file in one commit with `HfApi.create_commit`. The refreshed card replaces the
   export's `README.md` in the upload; the export directory itself is not changed.

Hub failures raise `HubError` with a one-line message that names the fix. No message contains the token.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id
from safetensors import SafetensorError, safe_open

from tbquant import __version__
from tbquant.errors import ExportError, HubError, TbquantError
from tbquant.model_card import render_model_card
from tbquant.serialization import WEIGHTS_NAME

try:
    from httpx2 import TransportError
except ImportError:  # huggingface_hub 1.x sends its requests with httpx
    from httpx import TransportError

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
# Either file lets AutoTokenizer rebuild the tokenizer. save_pretrained writes both for fast tokenizers.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
LOGIN_HINT = "log in with `hf auth login`, set HF_TOKEN, or pass --token"
OFFLINE_MESSAGE = "HF_HUB_OFFLINE is set, so nothing can be uploaded: unset HF_HUB_OFFLINE to push to the Hub"
# Text files that `warn_about_local_paths` reads, up to this size each.
_TEXT_SUFFIXES = (".json", ".csv", ".md", ".txt", ".jinja", ".yaml")
_MAX_SCANNED_BYTES = 10_000_000


@dataclasses.dataclass
class UploadFile:
    """One file of the commit: `source` is the file on disk, or None for the refreshed model card."""

    path_in_repo: str
    size: int
    source: Path | None


@dataclasses.dataclass
class UploadPlan:
    """Everything `upload` sends, decided before any request."""

    export_dir: Path
    repo_id: str
    files: list[UploadFile]
    card: str
    commit_message: str
    revision: str | None = None
    private: bool = False
    create_pr: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(file.size for file in self.files)


def check_repo_id(repo_id: str) -> None:
    """Reject a repository id that the Hub would reject, before any request.

    Raises:
        HubError: naming the id and the expected form.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubError(
            f"invalid repository id {repo_id!r}: expected NAME or NAMESPACE/NAME of at most 96 letters, digits, "
            "'-', '_' or '.', not starting or ending with '-' or '.', without '--' or '..'"
        ) from None


def _check_weights(directory: Path) -> None:
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise ExportError(f"{directory} has no {WEIGHTS_NAME}: the export is incomplete, export the model again")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = list(handle.keys())
            for name in names:
                handle.get_slice(name).get_shape()
    except (SafetensorError, OSError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ExportError(f"{WEIGHTS_NAME} in {directory} does not open ({first_line}): the export is corrupt, export the model again") from None
    if not names:
        raise ExportError(f"{WEIGHTS_NAME} in {directory} contains no tensors: export the model again")


def check_export(directory: Path) -> None:
    """Check that `directory` is a complete tbquant export and that it loads.

    Complete means: `config.json` with a tbquant `quantization_config`, packed weights whose
    safetensors header opens, and tokenizer files. Then the model and tokenizer are loaded
    with `tbquant.load_quantized`, so that a broken export is never uploaded.

    Raises:
        ExportError: naming the first problem.
    """
    from tbquant.loading import load_quantized, read_quantization_config

    read_quantization_config(directory)
    _check_weights(directory)
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise ExportError(f"{directory} has no tokenizer ({' or '.join(_TOKENIZER_FILES)}): export the model again")

    try:
        model, tokenizer = load_quantized(directory)
    except TbquantError as error:
        raise ExportError(f"export {directory} does not load: {error}") from None
    except (RuntimeError, ValueError, KeyError, OSError, TypeError) as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise ExportError(f"export {directory} does not load ({type(error).__name__}: {first_line}): export the model again") from None
    if tokenizer is None:
        raise ExportError(f"the tokenizer of export {directory} does not load: export the model again")
    del model, tokenizer


def list_export_files(directory: Path) -> list[Path]:
    """Return the files of an export to upload, in a stable order, without hidden files and
    the paths huggingface_hub's `upload_folder` skips (`.git`, `.cache/huggingface`)."""
    relative = sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file())
    visible = [name for name in relative if not any(part.startswith(".") for part in name.split("/"))]
    return [directory / name for name in filter_repo_objects(visible, ignore_patterns=DEFAULT_IGNORE_PATTERNS)]


def warn_about_local_paths(directory: Path, files: list[Path]) -> list[str]:
    """Log a warning for each small text file that contains the export's absolute location or the
    home directory, because the upload would publish it. Return the names of those files.

    Exports written by tbquant 0.1.0 stored the local path of `--data` in `training_log.json`.
    """
    locations = {str(directory.resolve().parent)}
    home = str(Path.home())
    if home not in ("/", ""):
        locations.add(home)
    flagged = []
    for path in files:
        if path.suffix not in _TEXT_SUFFIXES or path.stat().st_size > _MAX_SCANNED_BYTES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for location in sorted(locations):
            if location in text:
                logger.warning("%s contains the local path %s, which will be published: edit the file, or remove it from the export", path.name, location)
                flagged.append(path.name)
                break
    return flagged


def default_commit_message(directory: Path) -> str:
    from tbquant.loading import read_quantization_config

    quantization = read_quantization_config(directory)
    scheme = quantization.get("weights", {}).get("scheme", "ternary")
    bits = quantization.get("activations", {}).get("bits")
    activations = f"{bits}-bit" if bits else "full-precision"
    return f"Upload {scheme}-weight model with {activations} activations (tbquant {__version__})"


def prepare_upload(
    directory: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    commit_message: str | None = None,
    private: bool = False,
    create_pr: bool = False,
) -> UploadPlan:
    """Check the repository id and the export, list the files and render the model card.

    Sends no request.

    Raises:
        HubError: for an invalid repository id, revision or commit message.
        ExportError: for an incomplete export or one that does not load.
    """
    check_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise HubError(f"invalid --revision {revision!r}: pass a branch name, or leave the option out to upload to main")
    if commit_message is not None and not commit_message.strip():
        raise HubError(f"invalid --commit-message {commit_message!r}: pass a non-empty message, or leave the option out for the default")

    directory = Path(directory).expanduser()
    check_export(directory)

    card = render_model_card(directory, repo_id)
    paths = [path for path in list_export_files(directory) if path.relative_to(directory).as_posix() != CARD_NAME]
    warn_about_local_paths(directory, paths)
    files = [UploadFile(path.relative_to(directory).as_posix(), path.stat().st_size, path) for path in paths]
    files.append(UploadFile(CARD_NAME, len(card.encode("utf-8")), None))
    files.sort(key=lambda file: file.path_in_repo)
    return UploadPlan(
        export_dir=directory,
        repo_id=repo_id,
        files=files,
        card=card,
        commit_message=commit_message or default_commit_message(directory),
        revision=revision,
        private=private,
        create_pr=create_pr,
    )


def save_card(plan: UploadPlan) -> None:
    """Write the refreshed card into the export as `README.md`, replacing the old one atomically."""
    target = plan.export_dir / CARD_NAME
    descriptor, temporary = tempfile.mkstemp(prefix=".README.md.", dir=plan.export_dir)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(plan.card)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise ExportError(f"writing the model card to {target} failed: {error.strerror or error}") from None


def resolve_token(token: str | None = None) -> str:
    """Return `token`, else the token huggingface_hub finds: `HF_TOKEN`, then the stored login.

    Raises:
        HubError: if there is none.
    """
    resolved = token or get_token()
    if not resolved:
        raise HubError(f"no Hugging Face token found: {LOGIN_HINT}")
    return resolved


def _describe_http_error(error: HfHubHTTPError, plan: UploadPlan, endpoint: str) -> str:
    response = error.response
    status = f"{response.status_code} {response.reason_phrase}".strip()
    server_message = (error.server_message or "").strip().splitlines()
    detail = f": {server_message[0][:200]}" if server_message else ""
    if isinstance(error, RevisionNotFoundError):
        return f"branch {plan.revision!r} not found in {plan.repo_id} ({status}): create the branch first, or leave out --revision"
    if response.status_code == 401:
        return f"the Hub at {endpoint} rejected the token ({status}{detail}): {LOGIN_HINT} with a valid token"
    if response.status_code == 403:
        return f"the token may not write to {plan.repo_id} ({status}{detail}): use a token with write access, or a repository in your own namespace"
    if isinstance(error, RepositoryNotFoundError):
        return f"repository {plan.repo_id} not found on {endpoint} ({status}): check the repository id and that the token can write to it"
    if response.status_code >= 500:
        return f"the Hub at {endpoint} failed while uploading to {plan.repo_id} ({status}{detail}): try again later"
    return f"the Hub at {endpoint} rejected the upload to {plan.repo_id} ({status}{detail})"


def _retarget(plan: UploadPlan, repo_id: str) -> None:
    """Point the plan, and the usage example of its card, to `repo_id`."""
    plan.repo_id = repo_id
    plan.card = render_model_card(plan.export_dir, repo_id)
    for file in plan.files:
        if file.source is None:
            file.size = len(plan.card.encode("utf-8"))


def _commit_operations(plan: UploadPlan) -> list[CommitOperationAdd]:
    operations = []
    for file in plan.files:
        content = plan.card.encode("utf-8") if file.source is None else str(file.source)
        operations.append(CommitOperationAdd(path_in_repo=file.path_in_repo, path_or_fileobj=content))
    return operations


def upload(plan: UploadPlan, token: str, endpoint: str | None = None) -> CommitInfo:
    """Create the repository if needed, then upload the plan's files in one commit.

    With `plan.revision` and no pull request, the branch is created from main if it does not
    exist. With `plan.create_pr`, the commit opens a pull request against `plan.revision`
    (default: main).

    Raises:
        HubError: with one line for rejected tokens, missing permissions, server errors and
            unreachable endpoints.
    """
    api = HfApi(endpoint=endpoint, token=token, library_name="tbquant", library_version=__version__)
    try:
        repo_url = api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
        if repo_url.repo_id != plan.repo_id:
            # A repository id without a namespace is created in the token owner's namespace.
            _retarget(plan, repo_url.repo_id)
        if plan.revision is not None and not plan.create_pr:
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)
        logger.info("Uploading %d files (%.1f MB) to %s", len(plan.files), plan.total_bytes / 1e6, plan.repo_id)
        return api.create_commit(
            plan.repo_id,
            _commit_operations(plan),
            commit_message=plan.commit_message,
            revision=plan.revision,
            create_pr=plan.create_pr,
        )
    except HfHubHTTPError as error:
        message = _describe_http_error(error, plan, api.endpoint)
    except OfflineModeIsEnabled:
        message = OFFLINE_MESSAGE
    except (TransportError, ConnectionError) as error:
        message = f"cannot reach the Hub at {api.endpoint} ({type(error).__name__}: {error}): check the network connection and HF_ENDPOINT"
    raise HubError(message.replace(token, "***"))


def push_to_hub(
    directory: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
) -> CommitInfo:
    """Check a tbquant export, refresh its model card and upload it to the Hub in one commit.

    `endpoint` defaults to huggingface_hub's (`HF_ENDPOINT`, else https://huggingface.co).

    Raises:
        HubError: for an invalid repository id, a missing or rejected token and failed requests.
        ExportError: for an incomplete export or one that does not load.
    """
    check_repo_id(repo_id)
    resolved_token = resolve_token(token)
    plan = prepare_upload(directory, repo_id, revision=revision, commit_message=commit_message, private=private, create_pr=create_pr)
    return upload(plan, resolved_token, endpoint=endpoint)
