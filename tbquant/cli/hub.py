"""`tbquant push-to-hub`: publish an export on the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tbquant.cli._terminal import make_console

EXAMPLES = (
    "Examples:\n\n"
    "  tbquant push-to-hub smollm2-ternary-a8 my-name/SmolLM2-135M-ternary-a8 --dry-run\n\n"
    "  tbquant push-to-hub smollm2-ternary-a8 my-name/SmolLM2-135M-ternary-a8 --private\n\n"
    "  tbquant push-to-hub smollm2-ternary-a8 my-org/SmolLM2-135M-ternary-a8 --create-pr --commit-message 'Retrain with 300 steps'"
)

console = make_console(highlight=False, soft_wrap=True)


def _print_plan(plan) -> None:
    from huggingface_hub import constants

    table = Table(title=f"Files to upload to {constants.ENDPOINT}/{plan.repo_id}", header_style="bold")
    table.add_column("file")
    table.add_column("size", justify="right")
    for file in plan.files:
        label = f"{file.path_in_repo} (model card, rendered below)" if file.source is None else file.path_in_repo
        table.add_row(label, f"{file.size:,} bytes")
    table.add_row("total", f"{plan.total_bytes:,} bytes", style="bold")
    console.print(table)
    target = f"pull request against {plan.revision or 'main'}" if plan.create_pr else f"branch {plan.revision or 'main'}"
    console.print(f"Repository: {plan.repo_id} ({'private' if plan.private else 'public'} if created), {target}")
    console.print(f"Commit message: {plan.commit_message}", markup=False)
    console.rule("README.md")
    console.out(plan.card, highlight=False)
    console.rule()
    console.print("Dry run: nothing was sent.")


def push_to_hub(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Export directory written by tbquant compress.")],
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="Hub repository: NAMESPACE/NAME, or NAME in your own namespace.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private (an existing repository keeps its visibility).")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to commit to, created from main if missing. With --create-pr, the branch that the pull request targets \\[default: main].")] = None,
    commit_message: Annotated[str | None, typer.Option(help="Commit message \\[default: names the weight and activation bits and the tbquant version].")] = None,
    token: Annotated[str | None, typer.Option(help="Hugging Face token with write access \\[default: HF_TOKEN, then the login stored by hf auth login].", show_default=False)] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing to the branch.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the export and print the files, their sizes and the model card, without sending anything.")] = False,
    save_card: Annotated[bool, typer.Option("--save-card", help="Also write the refreshed model card into DIR/README.md once the upload succeeded, or at once with --dry-run (otherwise DIR is not changed).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs, and tracebacks of failures.")] = False,
) -> None:
    """Check an export, refresh its model card and upload it to the Hugging Face Hub in one commit."""
    from huggingface_hub import constants

    from tbquant.cli.main import _setup_logging
    from tbquant.errors import HubError
    from tbquant.hub import OFFLINE_MESSAGE, check_repo_id, prepare_upload, resolve_token, upload
    from tbquant.hub import save_card as write_card

    _setup_logging(verbose)
    check_repo_id(repo_id)
    # Offline mode and a missing token fail before the export is loaded; a dry run needs neither.
    if not dry_run and constants.is_offline_mode():
        raise HubError(OFFLINE_MESSAGE)
    resolved_token = None if dry_run else resolve_token(token)
    plan = prepare_upload(directory, repo_id, revision=revision, commit_message=commit_message, private=private, create_pr=create_pr)
    if dry_run:
        if save_card:
            write_card(plan)
        _print_plan(plan)
        return

    commit = upload(plan, resolved_token)
    # The card is written only after the upload succeeded, so that a failed push leaves DIR unchanged.
    if save_card:
        write_card(plan)
    console.print(f"Uploaded {len(plan.files)} files ({plan.total_bytes / 1e6:.1f} MB) to {plan.repo_id} in commit {commit.oid}")
    console.print(f"Pull request: {commit.pr_url}" if commit.pr_url else f"Commit: {commit.commit_url}")
