"""`skilltune push REF --repo ORG/NAME`: the ``hf`` export, checked, uploaded with ``huggingface_hub``.

The token comes from the environment (``HF_TOKEN`` by default), the repo is private unless
``--public``, and ``--dry-run`` builds and validates everything (export, parity, model card,
repo id, files) without touching the network.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from skilltune.export.build import ExportRequest, ExportResult, export
from skilltune.export.card import validate
from skilltune.export.gguf import ExportError
from skilltune.progress import SILENT, Stages
from skilltune.registry.api import Registry


@dataclass
class PushPlan:
    repo: str
    private: bool
    folder: Path
    files: list[tuple[str, int]]  # relative path, bytes
    result: ExportResult
    url: str | None = None  # set once uploaded


def _check_repo_id(repo: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise ExportError(f"--repo {repo!r} is not a Hub repo id ({exc})",
                          hint="use ORG/NAME, e.g. acme/sql-demo") from None
    if "/" not in repo:
        raise ExportError(f"--repo {repo!r} has no owner", hint="use ORG/NAME (your user name or an organisation)")


def push(registry: Registry, req: ExportRequest, repo: str, private: bool = True, dry_run: bool = False,
         token_env: str = "HF_TOKEN", stages: Stages = SILENT) -> PushPlan:
    _check_repo_id(repo)
    token = os.environ.get(token_env)
    if not dry_run and not token:
        raise ExportError(f"no Hugging Face token: ${token_env} is not set",
                          hint=f"export {token_env}=hf_... (a token with write access), or --dry-run to validate only")
    if req.format not in ("hf", "adapter"):
        raise ExportError(f"push uploads an hf or adapter folder, not {req.format!r}", hint="--format hf")
    with tempfile.TemporaryDirectory(prefix="skilltune-push-") as tmp:
        req.out = Path(tmp) / "repo"
        req.destination, req.record = f"https://huggingface.co/{repo}", not dry_run
        result = export(registry, req, stages)
        problems = validate(req.out)
        if problems:
            raise ExportError("the folder is not a valid Hub model repo: " + "; ".join(problems))
        files = sorted((str(p.relative_to(req.out)), p.stat().st_size) for p in req.out.rglob("*") if p.is_file())
        plan = PushPlan(repo, private, req.out, files, result)
        if dry_run:
            return plan
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with stages.stage(f"uploading {len(files)} files to {repo} ({'private' if private else 'public'})"):
            api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(folder_path=str(req.out), repo_id=repo, repo_type="model",
                                     commit_message=f"skilltune export of {req.ref}")
        plan.url = str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo}")
        registry.attach_metrics(req.ref, "pushed", {"repo": repo, "private": private, "url": plan.url,
                                                    "when": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return plan
