"""Logging: one JSON object per line, and a line per job transition."""

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from service.core.schemas import Job


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message and structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            # not formatTime: strftime costs more than the rest of an access line together
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str) -> None:
    """JSON lines on stdout for our loggers and uvicorn's; uvicorn's access log is ours."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # RequestObserver logs each request


log = logging.getLogger("sgd_service.jobs")


def log_job(job: Job) -> None:
    """One log line for a job's transition (the runner's, or a queue worker's)."""
    fields: dict[str, Any] = {"job_id": job.id, "status": job.status.value}
    fields.update(epoch=job.progress.epoch, epochs=job.progress.epochs, n_samples=job.n_samples)
    fields["attempts"] = job.attempts
    if job.error is not None:
        fields["error"] = job.error.type
    if job.result is not None:
        fields["model_version"] = job.result.model_version
    log.info("job %s", job.status.value, extra={"fields": fields})
