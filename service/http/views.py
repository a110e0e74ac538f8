"""Routes for people watching a fit: the history plot, live events and the web page."""

import asyncio
import json
from collections.abc import AsyncIterator
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from service.core.errors import AssetNotFound, ServiceError, TooManyStreams
from service.core.schemas import History, Job, ProgressEvent
from service.http.deps import READ, PlotterDep, StoreDep, StreamsDep
from service.http.problems import problems
from service.http.streams import Streams
from service.state.base import Store

if TYPE_CHECKING:
    pass

# A plot never needs more points than a figure has pixels across; fewer keeps it fast.
PLOT_POINTS = 2_000
CLIENT_CLOSED_REQUEST = 499  # the status logged for a plot whose caller left before it
IMAGE_TYPES = {"png": "image/png", "svg": "image/svg+xml"}
# A log axis draws losses within these bounds: matplotlib's log ticks overflow a float well
# before the largest float, and a loss of exactly 0 has no logarithm (see _log_losses).
LOG_FLOOR, LOG_CEILING = 1e-100, 1e100
# A linear axis draws values within ±this: its limits and ticks overflow a float beyond.
LINEAR_CEILING = 1e300

# Progress events carry the epochs of a fixed grid (every `stride`-th epoch, at most this many
# points per job, plus the last one), so a resumed stream continues exactly where it stopped.
EVENT_POINTS = 1_000
KEEPALIVE_SECONDS = 2.5
RETRY_MS = 1_000
END_ID = "end"

ASSETS = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}

router = APIRouter()


def _strict_bool(value: Any) -> Any:
    """A query flag is `true` or `false`, as JSON writes them: not 1, yes, on or True."""
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise PydanticCustomError("bool_parsing", "Input should be true or false")


# The same 422 problem as every other bad query parameter, naming it; OpenAPI still says boolean.
StrictFlag = Annotated[bool, BeforeValidator(_strict_bool)]


# -- the plot ------------------------------------------------------------------------------


@router.get(
    "/history/plot",
    dependencies=[READ],
    response_class=Response,
    responses={
        200: {
            "description": "The figure: loss, then w (and b), per epoch",
            "content": {"image/png": {}, "image/svg+xml": {}},
        },
        **problems(404, 422, 503),
    },
)
async def history_plot(
    request: Request,
    store: StoreDep,
    plotter: PlotterDep,
    job_id: str | None = None,
    image_format: Annotated[Literal["png", "svg"], Query(alias="format")] = "png",
    log: Annotated[
        StrictFlag,
        Query(
            description="draw the loss on a log scale (a loss of 0 at the smallest positive one)"
        ),
    ] = False,
) -> Response:
    """The tutorial's figure of the latest job (or ?job_id=): loss and w per epoch."""
    history = await run_in_threadpool(store.history, job_id, 0, None, PLOT_POINTS)
    image = await plotter.draw(history, image_format, log, gone=_hung_up(request))
    if image is None:  # nobody is there to answer; the log says so, as nginx's 499 does
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return Response(
        image, media_type=IMAGE_TYPES[image_format], headers={"Cache-Control": "no-store"}
    )


async def _hung_up(request: Request) -> None:
    """Return once the caller has closed its connection (a GET's body is read by nobody else)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- live events ---------------------------------------------------------------------------

EVENT_ID_PATTERN = rf"^(?:[0-9]{{1,18}}|{END_ID})$"
LAST_EVENT_ID_PARAMETER = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "description": "the id of the last event received: the stream resumes right after it",
    "schema": {"type": "string", "pattern": EVENT_ID_PATTERN},
}


def _event_schema() -> dict[str, Any]:
    """One event of the stream (OpenAPI 3.1 reads a stream's schema as that of each event)."""
    progress = ProgressEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    progress.pop("$defs", None)  # Progress is a component already (the Job uses it)

    def event(name: str, event_id: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        json_data = {"type": "string", "contentMediaType": "application/json"}
        return {
            "type": "object",
            "required": ["event", "id", "data"],
            "properties": {
                "event": {"const": name},
                "id": {"type": "string", **event_id},
                "data": {**json_data, "contentSchema": data},
            },
        }

    return {
        "oneOf": [
            event("progress", {"pattern": "^[0-9]+$"}, progress),
            event("end", {"const": END_ID}, {"$ref": "#/components/schemas/Job"}),
            event("problem", {"const": END_ID}, {"$ref": "#/components/schemas/Problem"}),
        ]
    }


@router.get(
    "/jobs/{job_id}/events",
    dependencies=[READ],
    response_class=StreamingResponse,
    responses={
        200: {
            "description": (
                "Server-Sent Events: `progress` events, then one `end` event (the job); "
                "a `problem` event instead if the job is evicted meanwhile"
            ),
            "content": {"text/event-stream": {"schema": _event_schema()}},
        },
        204: {"description": "Last-Event-ID says the client already has the end event"},
        **problems(404, 422, 503),
    },
    # Documented by hand: FastAPI would offer null for an optional header, sent as "null".
    openapi_extra={"parameters": [LAST_EVENT_ID_PARAMETER]},
)
async def job_events(
    job_id: str,
    store: StoreDep,
    streams: StreamsDep,
    last_event_id: Annotated[
        str | None, Header(pattern=EVENT_ID_PATTERN, include_in_schema=False)
    ] = None,
) -> Response:
    """Stream a job's progress as Server-Sent Events until it ends; resumes at Last-Event-ID."""
    job = await run_in_threadpool(store.get_job, job_id)
    if last_event_id == END_ID:
        return Response(status_code=204)  # tells an EventSource to stop reconnecting
    # A progress event's id is the epoch after its last point: where a resumed stream starts.
    resume = 0 if last_event_id is None else int(last_event_id)
    streams.check(job.id)  # 503 before the answer starts; the stream takes its place
    return StreamingResponse(
        _event_stream(store, streams, job, resume),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _sse(event: str, data: str, event_id: str) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {data}\n\n"


async def _event_stream(
    store: Store, streams: Streams, job: Job, resume: int
) -> AsyncIterator[str]:
    """Read the store whenever the job has changed: one progress event per read at most, then
    the end event. In between it waits on the store's notice, not on a timer."""
    try:
        with streams.admit(job.id), store.changes.watch(job.id) as changed:
            yield f"retry: {RETRY_MS}\n\n"
            async for event in _events(store, streams, changed, job, resume):
                yield event
    except TooManyStreams as exc:  # the last places went between the check and this start
        yield _sse("problem", json.dumps(exc.problem()), END_ID)


async def _events(
    store: Store, streams: Streams, changed: asyncio.Event, job: Job, resume: int
) -> AsyncIterator[str]:
    stride = max(1, -(-job.params.epochs // EVENT_POINTS))
    next_epoch = resume
    while True:
        changed.clear()  # a change from now on is read on the next turn
        try:
            # The job first: once it has ended, its history is complete.
            job, points = await run_in_threadpool(_poll, store, job.id, stride, next_epoch)
        except ServiceError as exc:  # evicted while streaming: say so, then stop
            yield _sse("problem", json.dumps(exc.problem()), END_ID)
            return
        if points is not None:
            next_epoch = points.epoch[-1] + 1
            yield _sse("progress", points.model_dump_json(), str(next_epoch))
        if job.status.ended:
            yield _sse("end", job.model_dump_json(), END_ID)
            return
        while not changed.is_set():
            try:
                await asyncio.wait_for(changed.wait(), KEEPALIVE_SECONDS)
            except TimeoutError:  # keeps proxies and read timeouts from closing the stream
                yield ": keep-alive\n\n"
        await asyncio.sleep(streams.pause())  # bounds the reads, of one and of all


def _poll(store: Store, job_id: str, stride: int, start: int) -> tuple[Job, ProgressEvent | None]:
    """The job, then its new grid points (off the event loop: a store may be across a network)."""
    job = store.get_job(job_id)
    return job, _grid_points(store, job, stride, start)


def _grid_points(store: Store, job: Job, stride: int, start: int) -> ProgressEvent | None:
    """The grid epochs recorded at or after `start` (and the final epoch once the job ended)."""
    total = job.progress.epoch
    first = -(-start // stride) * stride
    cols: dict[str, Any] = {"epoch": [], "w": [], "b": None, "loss": [], "val_loss": None}
    if first < total:
        count = (total - 1 - first) // stride + 1
        last = first + (count - 1) * stride
        # A range that ends on a grid point, thinned to `count` points, has exactly our stride.
        _extend(cols, store.history(job.id, first, last - first + 1, max(count, 2)))
    final = total - 1
    if job.status.ended and final >= start and final % stride:
        _extend(cols, store.history(job.id, final, 1, 2))
    if not cols["epoch"]:
        return None
    return ProgressEvent(**cols, progress=job.progress)


def _extend(cols: dict[str, Any], history: History) -> None:
    cols["epoch"] += history.epoch
    cols["w"] += history.w
    cols["loss"] += history.loss
    if history.val_loss is not None:
        cols["val_loss"] = (cols["val_loss"] or []) + history.val_loss
    if history.b is not None:
        cols["b"] = (cols["b"] or []) + history.b


# -- the page ------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse, responses={200: {"content": {"text/html": {}}}})
async def page() -> HTMLResponse:
    """A web page: submit data, watch the fit live, ask for a prediction."""
    return HTMLResponse(_asset("index.html"), headers={"Cache-Control": "no-cache"})


@router.get(
    "/static/{name}",
    response_class=Response,
    responses={200: {"content": {t.split(";")[0]: {} for t in ASSETS.values()}}, **problems(404)},
)
async def static_asset(name: Annotated[str, Path(examples=["page.js"])]) -> Response:
    """The page's script and style sheet (served here: the page loads nothing from elsewhere)."""
    if name not in ASSETS:
        raise AssetNotFound(f"no asset {name!r}; the page uses {', '.join(sorted(ASSETS))}")
    return Response(_asset(name), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})


@cache
def _asset(name: str) -> str:
    return (resources.files("service") / "static" / name).read_text(encoding="utf-8")
