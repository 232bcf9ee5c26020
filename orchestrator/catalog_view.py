"""`flow models`: the merged model catalog with prices, limits and warnings."""

from __future__ import annotations

import os

from pydantic import BaseModel, Field
from rich.table import Table

from orchestrator.agent_status import DIALECT, INSTALL, CliStatus
from orchestrator.config import LoadedConfig, ResolvedModel, resolve_api_key
from orchestrator.errors import ConfigError

# Environment variables litellm reads for models named without a provider.
VENDOR_KEYS = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "vertex_ai-language-models": "GOOGLE_APPLICATION_CREDENTIALS",
    "deepseek": "DEEPSEEK_API_KEY",
    "mistral": "MISTRAL_API_KEY",
    "groq": "GROQ_API_KEY",
    "openrouter": "OPENROUTER_API_KEY",
    "xai": "XAI_API_KEY",
}


class CatalogRow(BaseModel):
    name: str
    id: str
    provider: str
    protocol: str
    family: str
    input_per_million: float
    output_per_million: float
    price_source: str
    context_window: int | None
    max_output_tokens: int
    concurrency: int | None
    used_by: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


def _uses(loaded: LoadedConfig) -> dict[str, list[str]]:
    stages = loaded.config.stages
    uses: dict[str, list[str]] = {}
    uses.setdefault(stages.planner.model, []).append("planner")
    for b in stages.builders:
        uses.setdefault(b.model, []).append(f"builder×{b.count}")
    for r in stages.reviewers:
        uses.setdefault(r.model, []).append("reviewer")
    for (_stage, model), chain in loaded.fallback_chains().items():
        for name in chain:
            uses.setdefault(name, []).append(f"fallback of {model}")
    return uses


def _key_warning(model: ResolvedModel) -> str | None:
    if model.scripted:
        return None
    if model.api_key_ref is not None:
        try:
            resolve_api_key(model)
        except ConfigError:
            return f"environment variable {model.api_key_ref} is not set"
        return None
    if model.api == "litellm":
        vendor = (
            model.litellm_model.split("/", 1)[0] if "/" in model.litellm_model else model.family
        )
        var = VENDOR_KEYS.get(vendor) or VENDOR_KEYS.get(model.family)
        if var and not os.environ.get(var):
            return f"litellm reads {var} for this model, and it is not set"
    return None


def catalog_rows(loaded: LoadedConfig) -> list[CatalogRow]:
    uses = _uses(loaded)
    rows = []
    for name, m in sorted(loaded.models.items()):
        provider = loaded.config.providers.get(m.provider) if m.provider else None
        row = CatalogRow(
            name=name,
            id=m.litellm_model,
            provider=m.provider or "-",
            protocol=m.api,
            family=m.family,
            input_per_million=m.input_per_token * 1e6,
            output_per_million=m.output_per_token * 1e6,
            price_source=m.price_source,
            context_window=m.context_window,
            max_output_tokens=m.max_output_tokens,
            concurrency=provider.max_concurrency if provider else None,
            used_by=uses.get(name, []),
        )
        warning = _key_warning(m)
        if warning:
            row.warnings.append(warning)
        if not row.used_by:
            row.warnings.append("not used by any stage")
        if m.context_window is None and not m.scripted:
            row.warnings.append("context window unknown (set models.<name>.context_window)")
        rows.append(row)
    return rows


def catalog_table(rows: list[CatalogRow]) -> Table:
    table = Table(box=None)
    for col in (
        "model",
        "provider",
        "protocol",
        "family",
        "$/M in",
        "$/M out",
        "price from",
        "context",
        "max out",
        "slots",
        "used by",
    ):
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(
            r.name,
            r.provider,
            r.protocol,
            r.family,
            f"{r.input_per_million:g}",
            f"{r.output_per_million:g}",
            r.price_source,
            f"{r.context_window:,}" if r.context_window else "?",
            f"{r.max_output_tokens:,}",
            str(r.concurrency or "-"),
            ", ".join(r.used_by) or "-",
        )
    return table


def agents_table(clis: list[CliStatus]) -> Table:
    """Agent CLIs: installed where, which version, the dialect flow's proxy speaks to it."""
    table = Table(title="agent CLIs", title_justify="left")
    for column in ("agent", "version", "path", "dialect", "used by"):
        table.add_column(column)
    for s in clis:
        table.add_row(
            s.name,
            s.version or ("[red]not installed[/]" if s.path is None else "[red]no answer[/]"),
            s.path or f"install: {INSTALL[s.name]}",
            DIALECT[s.name],
            ", ".join(s.used_by) or "-",
        )
    return table
