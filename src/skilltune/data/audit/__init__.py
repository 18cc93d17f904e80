"""`skilltune data audit`: registered checks over a data file, with terminal/JSON/Markdown/HTML reports."""

from skilltune.data.audit import checks as _builtin  # noqa: F401  (registers the built-in checks)
from skilltune.data.audit.base import CHECKS, AuditContext, Check, CheckResult, Finding, register_check
from skilltune.data.audit.run import AuditReport, audit_file

__all__ = ["CHECKS", "AuditContext", "AuditReport", "Check", "CheckResult", "Finding", "audit_file", "register_check"]
