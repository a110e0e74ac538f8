"""The /v2 routes: health, metadata and inference.

The model is named by SGD_MODEL_NAME; its input `hours` and output `score` are FP64 tensors of
shape [-1]. An inference is /predict's: one read of the served model (or of a kept version, as
`?version=` reads it), plain Python, never torch, never a wait on training.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from service import __version__
from service.core.errors import (
    IntervalUnavailable,
    ModelNotReady,
    StoreUnavailable,
    VersionNotFound,
)
from service.core.schemas import Model
from service.core.settings import Settings
from service.http import scoring
from service.http.deps import PREDICT, SettingsDep, StoreDep
from service.http.direct import DirectRoute
from service.http.oip import codec
from service.http.oip.codec import Inference
from service.http.oip.errors import InvalidInferenceRequest, ModelNotFound, errors
from service.http.oip.models import (
    BINARY_TYPE,
    EXTENSIONS,
    HEADER_LENGTH,
    INPUT,
    JSON_TYPE,
    LOWER,
    OUTPUT,
    OUTPUTS,
    PLATFORM,
    SERVER_NAME,
    UPPER,
    VERSION,
    InferenceResponse,
    MetadataTensor,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
)
from service.http.scoring import Floats
from service.http.turns import give_way
from service.state.base import Store

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])


async def _model_name(name: str, settings: SettingsDep) -> str:
    if name != settings.model_name:
        raise ModelNotFound(f"no model {name!r}: this server serves {settings.model_name!r}")
    return name


NameDep = Annotated[str, Depends(_model_name)]


async def _version_number(name: NameDep, version: str) -> int:
    if not VERSION.fullmatch(version):
        raise VersionNotFound(
            f"model {name!r} has no version {version!r}: versions are numbers, and "
            f"GET /v2/models/{name} lists the kept ones"
        )
    return int(version)


VersionDep = Annotated[int, Depends(_version_number)]


def _served(store: Store, name: str) -> Model:
    model = store.model  # one read: one version
    if model is None:
        why = store.unreachable
        if why is not None:
            raise StoreUnavailable(f"model {name!r}: this replica has not read it yet: {why}")
        raise ModelNotReady(
            f"model {name!r} is not ready: no fit has succeeded yet (POST /fit, then retry)"
        )
    return model


async def _kept(store: Store, name: str, version: int) -> Model:
    try:
        held = store.held(version)
        return held if held is not None else await run_in_threadpool(store.version, version)
    except VersionNotFound:
        raise VersionNotFound(
            f"model {name!r} has no version {version}: GET /v2/models/{name} lists the kept ones"
        ) from None


@router.get("", responses=errors(400))
async def server_metadata() -> ServerMetadata:
    """Server metadata: name, version and the protocol extensions it supports."""
    return ServerMetadata(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)


@router.get("/health/live", responses=errors(400))
async def server_live() -> ServerLive:
    """Liveness: the process answers."""
    return ServerLive(live=True)


@router.get("/health/ready", responses=errors(400, 503))
async def server_ready(store: StoreDep, settings: SettingsDep) -> ServerReady:
    """Readiness for inference: 200 once a model is served, 503 before."""
    _served(store, settings.model_name)
    return ServerReady(ready=True)


async def _metadata(store: Store, settings: Settings) -> ModelMetadata:
    kept = await run_in_threadpool(store.versions, settings.keep_versions)
    return ModelMetadata(
        name=settings.model_name,
        versions=[str(m.version) for m in kept],
        platform=PLATFORM,
        inputs=[MetadataTensor(name=INPUT, datatype="FP64", shape=[-1])],
        outputs=[MetadataTensor(name=o, datatype="FP64", shape=[-1]) for o in OUTPUTS],
    )


@router.get("/models/{name}", dependencies=[PREDICT], responses=errors(400, 404, 503))
async def model_metadata(name: NameDep, store: StoreDep, settings: SettingsDep) -> ModelMetadata:
    """The model's metadata: its kept versions, its input and output tensors."""
    return await _metadata(store, settings)


@router.get(
    "/models/{name}/versions/{version}", dependencies=[PREDICT], responses=errors(400, 404, 503)
)
async def version_metadata(
    name: NameDep, version: VersionDep, store: StoreDep, settings: SettingsDep
) -> ModelMetadata:
    """The model's metadata, for a kept version (404 for any other)."""
    await _kept(store, name, version)
    return await _metadata(store, settings)


@router.get("/models/{name}/ready", dependencies=[PREDICT], responses=errors(400, 404, 503))
async def model_ready(name: NameDep, store: StoreDep) -> ModelReady:
    """Model readiness: 200 once a model is served, 503 before."""
    _served(store, name)
    return ModelReady(name=name, ready=True)


@router.get(
    "/models/{name}/versions/{version}/ready",
    dependencies=[PREDICT],
    responses=errors(400, 404, 503),
)
async def version_ready(name: NameDep, version: VersionDep, store: StoreDep) -> ModelReady:
    """Readiness of a version: 200 while it is kept, 404 otherwise."""
    await _kept(store, name, version)
    return ModelReady(name=name, ready=True)


_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferenceResponse,
        "description": "The scores; with binary outputs asked for, the JSON object then the "
        f"binary data as {BINARY_TYPE}, the JSON's length in {HEADER_LENGTH}",
        "content": {BINARY_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    },
    **errors(400, 404, 409, 413, 503),  # 400's description: `document` writes the rules in
}


class _Infer(DirectRoute):
    """An inference route: the model's name (and version) checked, as their dependencies check
    them; the endpoint reads the body."""

    async def read(self, request: Request, settings: Settings) -> dict[str, Any]:
        params = request.path_params
        name = await _model_name(params["name"], settings)
        if "version" not in params:
            return {"name": name, "request": request, "key": _caller(request)}
        version = await _version_number(name, params["version"])
        return {"name": name, "version": version, "request": request}


CALLER = "while a canary runs, one key always gets the same version (a hash of it)"


def _caller(request: Request) -> str | None:
    """The X-Caller-Key header, read only while a canary runs (it picks the version)."""
    if request.scope["state"]["store"].canary is None:
        return None
    return scoring.caller_key(request.scope)


async def infer(
    name: NameDep,
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    key: Annotated[str | None, Header(alias="X-Caller-Key", description=CALLER)] = None,
) -> Response:
    """Inference with the served model (or the canary, for its share): `hours` in, `score`
    out. The X-Prediction-Id header names the answer (and its version) for POST /outcomes."""
    asked = await _read(request, name, settings)
    return await _answer(name, scoring.routed(store, _served(store, name), key), asked)


async def infer_version(
    name: NameDep, version: VersionDep, request: Request, store: StoreDep, settings: SettingsDep
) -> Response:
    """Inference with a kept version (404 for any other)."""
    asked = await _read(request, name, settings)
    return await _answer(name, await _kept(store, name, version), asked)


for path, endpoint in (
    ("/models/{name}/infer", infer),
    ("/models/{name}/versions/{version}/infer", infer_version),
):
    router.add_api_route(
        path,
        endpoint,
        methods=["POST"],
        dependencies=[PREDICT],
        response_model=None,
        responses=_INFER_RESPONSES,
        route_class_override=_Infer,
    )

# A JSON object this long or longer is read in steps, the loop handed back between them
# (give_way); below it, parsing, checking and scoring it takes less than a turn of a busy loop.
SMALL_JSON = 16 * 1024


async def _read(request: Request, name: str, settings: Settings) -> Inference:
    """The request's body, checked at the edge like POST /predict's; the model comes after."""
    try:
        body = await request.body()
    except ClientDisconnect:  # the caller left mid-body: nothing to answer, nothing to log
        raise InvalidInferenceRequest("the body ended before its Content-Length") from None
    header, binary = codec.split(body, request.headers)
    codec.refuse_crowded(header, settings.max_predict_batch)
    if len(header) < SMALL_JSON:
        return codec.decode(header, binary, name, settings)
    steps = codec.decoding(header, binary, name, settings)
    while True:
        await give_way()  # before each step of ~1 ms: /predict goes first
        try:
            next(steps)
        except StopIteration as done:
            asked: Inference = done.value
            return asked


async def _interval(model: Model, asked: Inference, scores: Floats) -> tuple[str, Floats, Floats]:
    """The interval's method, and its bounds around the scores; an unbounded interval is
    refused: JSON has no infinity."""
    assert asked.coverage is not None
    method, half = await scoring.half_width(model, asked.hours, asked.coverage, asked.method)
    bounds = scoring.bounds(
        scores,
        half,
        lambda: InvalidInferenceRequest(
            f"a bound of the interval overflows a float: send smaller {INPUT}"
        ),
    )
    if bounds is None:
        conformal = model.intervals.conformal if model.intervals else None
        n = conformal.n if conformal else 0
        raise IntervalUnavailable(
            f"the conformal interval of version {model.version} at coverage "
            f"{asked.coverage:g} is unbounded: it stands on {n} held-out rows, which bound "
            f"coverages up to {n}/{n + 1}; ask for less, or method gaussian"
        )
    return method, *bounds


async def _answer(name: str, model: Model, asked: Inference) -> Response:
    """The scores of one model version, as JSON or as binary data after the JSON object."""

    def overflow(i: int) -> InvalidInferenceRequest:
        return InvalidInferenceRequest(
            f"the score of {INPUT}[{i}] = {asked.hours[i]:g} overflows a float: send "
            f"smaller {INPUT}"
        )

    scores = scoring.scores(model, asked.hours, overflow)
    values, parameters = {OUTPUT: scores}, None
    if asked.coverage is not None:
        method, values[LOWER], values[UPPER] = await _interval(model, asked, scores)
        parameters = {"coverage": asked.coverage, "method": method}
    parts, json_length = codec.encoding(name, model.version, asked, values, parameters)
    written = [next(parts)]
    for part in parts:  # 16,384 scores at a time
        await give_way()
        written.append(part)
    body = written[0] if len(written) == 1 else b"".join(written)
    headers = scoring.answered_by(model)
    if json_length is None:
        return Response(body, media_type=JSON_TYPE, headers=headers)
    headers[HEADER_LENGTH] = str(json_length)
    return Response(body, media_type=BINARY_TYPE, headers=headers)
