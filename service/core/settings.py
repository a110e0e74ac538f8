"""Service settings, read from SGD_* environment variables and validated at start-up."""

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PREFIX = "SGD_"
# What a request may do (service.access): predictions, reads, fits, serving a version.
Scope = Literal["predict", "read", "train", "admin"]
# SGD_* variables that are not settings of the server but are read by its command line.
CLIENT_VARIABLES = {"SGD_URL": "the client commands' --url"}


class Settings(BaseSettings):
    """Every knob of the service; the defaults work out of the box."""

    # An empty variable (SGD_API_TOKEN= in a compose file) means "not set", not "empty token".
    model_config = SettingsConfigDict(
        env_prefix=PREFIX, frozen=True, extra="forbid", env_ignore_empty=True
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    max_samples: int = Field(default=1_000_000, ge=1, le=100_000_000)
    max_epochs: int = Field(default=1_000_000, ge=1, le=1_000_000_000)
    # The work of one fit, not only its parts: epochs x samples per epoch (batch_size, or n for
    # full batch). The default is a few minutes of the only worker at most (README, Settings).
    max_sample_steps: int = Field(default=10_000_000_000, ge=1)
    max_abs_value: float = Field(default=1e9, gt=0, allow_inf_nan=False)
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_predict_batch: int = Field(default=10_000, ge=1)
    max_queued_jobs: int = Field(default=16, ge=1)
    keep_jobs: int = Field(default=20, ge=1)
    # Model versions kept (GET /models, rollback); the oldest go first, never the served one.
    keep_versions: int = Field(default=100, ge=1)
    # Outcomes (POST /outcomes) kept for continuous training; the oldest go first.
    keep_outcomes: int = Field(default=100_000, ge=1, le=10_000_000)
    # A version's live quality (MAE, RMSE, coverage) is over its last this many outcomes.
    quality_window: int = Field(default=1000, ge=1, le=1_000_000)
    # Continuous training (off: 0): every this many new outcomes, a warm-started fit on the
    # last retrain_rows outcomes, rolled out as a canary of retrain_traffic percent that the
    # rule (retrain_promote_after outcomes, retrain_max_worse) promotes or rolls back.
    retrain_after: int = Field(default=0, ge=0)
    retrain_rows: int = Field(default=1000, ge=2)
    retrain_epochs: int = Field(default=1000, ge=1)
    retrain_traffic: int = Field(default=10, ge=1, le=99)
    retrain_promote_after: int = Field(default=100, ge=1)
    retrain_max_worse: float = Field(default=0.05, ge=0, le=100)
    # ... and the rows of the served version's fit too: every kept version keeps its fit's rows
    # (16 bytes a row) while this is on.
    retrain_fit_rows: bool = False
    # A job whose training worker died (OOM killer, kill -9) runs again on a new worker, up to
    # this many runs in all: at-least-once.
    job_attempts: int = Field(default=2, ge=1, le=10)
    # Wall-clock seconds a job may run, retries included; past it the job fails `timeout` and
    # the worker takes the next fit. No fit within the default limits comes near it here.
    job_timeout: float = Field(default=3600.0, gt=0, le=7 * 24 * 3600)
    history_max_points: int = Field(default=10_000, ge=2, le=1_000_000)
    # Event streams (GET /jobs/{id}/events) a replica holds, in all and per job; more get 503.
    max_streams: int = Field(default=1000, ge=1, le=1_000_000)
    max_job_streams: int = Field(default=100, ge=1, le=1_000_000)

    # The model's name in the Open Inference Protocol's paths (/v2/models/{name}): one URL
    # segment, as Triton and KServe name models.
    model_name: str = Field(default="sgd", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

    # Connections (service.connections): past this many open ones a new one gets a 503; a
    # request's headers must arrive within header_timeout, its body within body_timeout.
    max_connections: int = Field(default=2048, ge=1, le=1_000_000)
    header_timeout: float = Field(default=10.0, gt=0, le=3600)
    body_timeout: float = Field(default=60.0, gt=0, le=3600)

    # Who may do what (service.access): SGD_API_TOKEN holds every scope; the named tokens of
    # tokens_file (SHA-256 hashes, read again when it changes) theirs; open_scopes need none.
    api_token: SecretStr | None = None
    tokens_file: Path | None = None
    open_scopes: Annotated[tuple[Scope, ...], NoDecode] = ("predict", "read")
    # The Host header values answered (anything else is a 400): a page on another site that
    # the user visits cannot reach a service on loopback by DNS rebinding. Comma-separated
    # names, ports ignored, IPv6 with or without brackets; "*" any host, "*.example.com" its
    # subdomains.
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ("localhost", "127.0.0.1", "::1")

    torch_threads: int = Field(default=1, ge=1, le=256)
    # The fit is background work: a positive niceness lets the scheduler favour /predict.
    worker_nice: int = Field(default=19, ge=0, le=19)
    # Linux SCHED_IDLE on top: the worker runs only on CPU time that nothing else wants, and
    # a request that wakes up preempts it at once (niceness alone only shortens its turns).
    worker_sched_idle: bool = True
    # After SIGTERM, /readyz answers 503 for this long before the server stops listening,
    # so a load balancer can take the replica out of rotation first.
    drain_seconds: float = Field(default=1.0, ge=0, le=60)

    # Shared state for many replicas (README, "Scaling out"): when set, model versions, jobs,
    # histories, idempotency keys and the queue of fits live in this Redis; unset, in memory.
    redis_url: SecretStr | None = None
    # Namespaces every key, so that two services can share one Redis.
    redis_prefix: str = Field(default="sgd:", min_length=1, max_length=64)
    # Training workers `serve` runs beside the API in Redis mode (0: this replica only serves).
    workers: int = Field(default=1, ge=0, le=64)
    # A worker silent this long (no heartbeat: killed, paused, cut off) has lost its job, which
    # another worker runs again; its late writes are refused (fenced).
    lease_seconds: float = Field(default=10.0, ge=1, le=600)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            scheme = value.get_secret_value().partition("://")[0]
            if scheme not in ("redis", "rediss", "unix"):
                raise ValueError("a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("open_scopes", mode="before")
    @classmethod
    def _scopes(cls, value: object) -> object:
        if isinstance(value, str):  # "none": every scope needs a token (empty means unset)
            names = [s.strip() for s in value.split(",") if s.strip()]
            return () if names == ["none"] else tuple(names)
        return value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _host_names(cls, value: object) -> object:
        names = value.split(",") if isinstance(value, str) else value
        if not isinstance(names, list | tuple):
            return value
        hosts = tuple(str(n).strip().lower().removeprefix("[").removesuffix("]") for n in names)
        if not all(hosts):
            raise ValueError("a comma-separated list of host names, e.g. localhost,example.com")
        return hosts


class SettingsError(Exception):
    """The environment holds a setting the service cannot use; the message says which and why."""


def load_settings() -> Settings:
    """Settings from the environment; SettingsError names each bad variable, its value and why."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = PREFIX + "_".join(str(part) for part in error["loc"]).upper()
            hidden = name in ("SGD_API_TOKEN", "SGD_REDIS_URL")  # a URL may hold a password
            value = "(hidden)" if hidden else repr(error.get("input"))
            problems.append(f"{name}={value}: {error['msg']}")
        raise SettingsError("; ".join(problems)) from None


def unknown_variables(environ: Mapping[str, str] = os.environ) -> list[str]:
    """A line for each SGD_* variable that is no setting (a typo is otherwise silently ignored)."""
    known = {PREFIX + name.upper() for name in Settings.model_fields} | set(CLIENT_VARIABLES)
    lines = []
    for name in sorted(n for n in environ if n.upper().startswith(PREFIX)):
        if name.upper() in known:
            continue
        near = difflib.get_close_matches(name.upper(), sorted(known), n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        lines.append(f"{name} is not a setting and is ignored{hint}")
    return lines
