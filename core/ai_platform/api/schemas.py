"""Request/response schemas of the system endpoints: health, operations, plugins (operations bring their own;
limits and quotas are in ``ai_platform.limits.schemas``)."""

from __future__ import annotations

import msgspec


class PublicModelHealth(msgspec.Struct, kw_only=True):
    """A model as the seed's ``/health`` example shows it, to anyone."""

    name: str
    loaded: bool
    path: str


class ModelAgreement(msgspec.Struct, kw_only=True):
    """How closely a model folder's graph follows its fp32 source, as its export measured and recorded it."""

    top1: float  # share of calibration positions where both put the same token first, 0..1
    mean_kl: float  # mean KL divergence of its next-token distributions from the source's, nats
    positions: int  # of the calibration text
    passed: bool  # whether it met the threshold of its export (min_top1, max_mean_kl)
    min_top1: float
    max_mean_kl: float


class ModelHealth(msgspec.Struct, kw_only=True):
    """A model as an admin sees it: also where it runs, why it is not loaded, and what its export recorded."""

    name: str
    loaded: bool
    path: str
    provider: str | None
    error: str | None = None
    precision: str | None = None  # of the weights (fp32, int8, int4), from the folder's export.json
    agreement: ModelAgreement | None = None  # None: the folder has no recorded measurement


class PluginHealth(msgspec.Struct, kw_only=True):
    name: str
    status: str
    error: str | None = None


class HealthResponse(msgspec.Struct, kw_only=True):
    """``GET /health`` without an admin key: the seed's fields, no internals (issue 11)."""

    status: str
    uptime_seconds: float
    memory_used_mb: float
    memory_total_mb: float
    cpu_percent: float
    models: list[PublicModelHealth]
    timestamp: str


class AdminHealthResponse(msgspec.Struct, kw_only=True):
    """``GET /health`` with an admin key: also the server's memory, load errors, providers and failed plugins."""

    status: str
    uptime_seconds: float
    memory_used_mb: float
    memory_total_mb: float
    cpu_percent: float
    process_rss_mb: float
    models: list[ModelHealth]
    failed_plugins: list[PluginHealth]
    timestamp: str


class OperationEntry(msgspec.Struct, kw_only=True):
    name: str
    summary: str
    path: str
    plugin: str
    model: str
    daily_limit: int  # today's, as GET /limits shows it (PUT /limits changes it)
    max_input_chars: int
    max_output_tokens: int | None  # None: the operation only chooses among options (it generates nothing)
    max_input_tokens: int | None
    schema: str


class OperationsResponse(msgspec.Struct, kw_only=True):
    operations: list[OperationEntry]


class PluginEntry(msgspec.Struct, kw_only=True):
    name: str
    distribution: str | None
    version: str | None
    status: str
    operations: list[str]
    hooks: list[str]
    error: str | None


class PluginsResponse(msgspec.Struct, kw_only=True):
    plugins: list[PluginEntry]
