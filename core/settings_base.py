"""Base class for configuration sections: every section rejects unknown keys."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A configuration section. ``extra="forbid"`` turns typos into errors, not silent defaults."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
