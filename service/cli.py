"""The `sgd-service` command line: its parser, the commands that talk to a running service
(fit, predict, outcomes, history, models), `token`, and the settings `serve` and `worker` start
with."""

import argparse
import json
import math
import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, NoReturn

import httpx
from pydantic import ValidationError

from service.client import (
    ClientError,
    FitOptions,
    ImageFormat,
    ProblemError,
    Publish,
    SGDClient,
)
from service.core.intervals import MAX_COVERAGE, METHODS, MIN_COVERAGE
from service.core.schemas import Job, JobStatus
from service.core.settings import Scope, Settings, SettingsError, load_settings
from service.http.access import SCOPES, NamedToken, TokensFileError, digest, read_tokens

# -- client commands: talk to a running service ---------------------------------------------

CLIENT_TIMEOUT = 30.0


def default_url(environ: Mapping[str, str] = os.environ) -> str:
    """$SGD_URL, else where `sgd-service serve` listens with the same SGD_HOST and SGD_PORT."""
    if environ.get("SGD_URL"):
        return environ["SGD_URL"]
    host = environ.get("SGD_HOST") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):  # noqa: S104  # every interface: reach it on the loopback
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{environ.get('SGD_PORT') or 8000}"


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit status 2), no usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _finite(text: str) -> float:
    """A float argument that JSON can carry: NaN and infinities are refused here, not sent."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _seconds(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a number of seconds >= 0, not {text!r}")
    return value


def _url(text: str) -> str:
    """An http(s) URL with a host (from --url or $SGD_URL)."""
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise argparse.ArgumentTypeError(f"not a URL: {text!r} ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(f"not an http:// or https:// URL with a host: {text!r}")
    return text


PLOT_FORMATS: dict[str, ImageFormat] = {".png": "png", ".svg": "svg"}  # what /history/plot draws


def _plot_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the service draws .png and .svg; name the file with one of these"
        )
    return path


def add_client_commands(sub: "argparse._SubParsersAction[Parser]") -> None:
    """The fit, wait, predict, outcomes, models and history subcommands."""
    common = Parser(add_help=False)
    common.add_argument(
        "--url",
        type=_url,
        default=default_url(),
        help="the service (default: $SGD_URL, else SGD_HOST and SGD_PORT as `serve` reads them: "
        "%(default)s); $SGD_API_TOKEN is sent if set",
    )
    fit = sub.add_parser("fit", parents=[common], help="start a fit; prints the job as JSON")
    fit.add_argument("--x", type=_finite, nargs="+", required=True, help="hours studied")
    fit.add_argument("--y", type=_finite, nargs="+", required=True, help="exam scores")
    fit.add_argument("--epochs", type=int)
    fit.add_argument("--learning-rate", type=_finite)
    fit.add_argument("--init-w", type=_finite)
    fit.add_argument(
        "--batch-size",
        type=_batch_size,
        default=argparse.SUPPRESS,
        help="samples per epoch, or 'all' (full-batch)",
    )
    fit.add_argument("--fit-intercept", action="store_true", default=None, help="learn b too")
    fit.add_argument("--seed", type=int)
    fit.add_argument(
        "--validation-fraction",
        type=_finite,
        help="hold out this share of the rows (0..0.5, chosen with the seed): val_mse, val_r2",
    )
    fit.add_argument(
        "--tol",
        type=_tol,
        default=argparse.SUPPRESS,
        help="stop early once the loss stops improving by tol (scikit-learn's), or 'off'",
    )
    fit.add_argument(
        "--n-iter-no-change", type=int, help="epochs without improvement before --tol stops"
    )
    fit.add_argument(
        "--publish",
        choices=PUBLISH,
        help="serve the new version always, never, or if_better on the held-out rows",
    )
    fit.add_argument(
        "--init-from",
        type=_init_from,
        metavar="served|VERSION",
        help="warm start from the served model or a kept version, not --init-w",
    )
    fit.add_argument(
        "--wait",
        action="store_true",
        help="wait for the job to end (its id goes to stderr first; Ctrl-C cancels it): on a "
        "terminal a live progress bar and a last line, else the ended job as JSON",
    )
    add_wait_options(fit, "for --wait: ")
    wait = sub.add_parser(
        "wait",
        parents=[common],
        help="wait for a job started elsewhere to end, as fit --wait does (Ctrl-C stops "
        "waiting, and leaves the job alone)",
    )
    wait.add_argument("job_id", metavar="JOB_ID")
    add_wait_options(wait, "")
    predict = sub.add_parser("predict", parents=[common], help="print the score for each hours")
    predict.add_argument("hours", type=_finite, nargs="+")
    predict.add_argument("--version", type=_version, help="a kept model version (default: served)")
    predict.add_argument(
        "--coverage",
        type=_coverage,
        help=f"also print an interval holding the true score with this probability "
        f"({MIN_COVERAGE:g}..{MAX_COVERAGE:g}, e.g. 0.9): score [lower, upper] (90%% method)",
    )
    predict.add_argument(
        "--method",
        choices=METHODS,
        help="with --coverage: how the interval is computed (default: the version's first, "
        "conformal when its fit held rows out)",
    )
    predict.add_argument(
        "--key",
        type=_caller_key,
        help="who asks (a user, a session): during a canary rollout the same key always gets "
        "the same version (default: a random one each time)",
    )
    outcomes = sub.add_parser(
        "outcomes",
        parents=[common],
        help="record the scores that really happened; prints the receipt as JSON",
    )
    outcomes.add_argument("--hours", type=_finite, nargs="+", required=True, help="hours studied")
    outcomes.add_argument(
        "--score", type=_finite, nargs="+", required=True, help="the true score of each"
    )
    predicted_by = outcomes.add_mutually_exclusive_group()
    predicted_by.add_argument(
        "--prediction-id",
        metavar="ID",
        help="the X-Prediction-Id of the answer they follow (v3-9f1c…)",
    )
    predicted_by.add_argument(
        "--model-version", type=_version, metavar="VERSION", help="the version that predicted them"
    )
    models = sub.add_parser(
        "models",
        parents=[common],
        help="print the kept model versions as JSON, --serve one (or start its canary), or "
        "--rollback a canary",
    )
    models.add_argument("--limit", type=int, default=20, help="at most this many (newest first)")
    serve_or_rollback = models.add_mutually_exclusive_group()
    serve_or_rollback.add_argument(
        "--serve", type=_version, metavar="VERSION", help="serve this kept version (a rollback)"
    )
    serve_or_rollback.add_argument(
        "--rollback",
        type=_version,
        metavar="VERSION",
        help="end this version's canary rollout: the stable version answers everyone again",
    )
    models.add_argument(
        "--traffic",
        type=_traffic,
        metavar="PERCENT",
        help="with --serve: a canary; this percent of predictions go to it (100: promote it, "
        "0: roll it back)",
    )
    models.add_argument(
        "--promote-after",
        type=_count,
        metavar="OUTCOMES",
        help="with --serve: decide by itself once the canary has this many outcomes "
        "(default: by hand)",
    )
    models.add_argument(
        "--max-worse",
        type=_share,
        metavar="SHARE",
        help="with --promote-after: promote if its MAE is at most the stable version's "
        "x (1 + SHARE), e.g. 0.05",
    )
    history = sub.add_parser(
        "history", parents=[common], help="print a job's history as JSON (one line), or --plot it"
    )
    history.add_argument("--job-id", help="default: the latest job")
    history.add_argument(
        "--max-points", type=int, help="thin the JSON to about this many epochs (not with --plot)"
    )
    history.add_argument(
        "--plot",
        type=_plot_path,
        help="write the figure here: .png or .svg (the service thins it to 2,000 points)",
    )
    history.add_argument(
        "--log", action="store_true", help="with --plot: draw the loss on a log scale"
    )


def add_wait_options(command: Parser, prefix: str) -> None:
    """--timeout, --json and --progress: how a wait ends and what it shows where."""
    command.add_argument("--timeout", type=_seconds, default=600.0, help=f"{prefix}seconds")
    command.add_argument(
        "--json",
        action="store_true",
        help=f"{prefix}print the ended job as JSON on stdout even on a terminal, no bar "
        "(what a program reading stdout always gets)",
    )
    command.add_argument(
        "--progress",
        action="store_true",
        help=f"{prefix}draw the progress bar on stderr even when stdout is not a terminal",
    )


class UsageError(Exception):
    """A command line or environment the client commands cannot use (exit status 2)."""


def _headers(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    token = environ.get("SGD_API_TOKEN")
    if not token:
        return {}
    # An HTTP header carries visible ASCII only; any other token could never be sent.
    if not (token.isascii() and token.isprintable()):
        raise UsageError("SGD_API_TOKEN holds characters an HTTP header cannot carry")
    return {"Authorization": f"Bearer {token}"}


def run_client_command(args: argparse.Namespace) -> int:
    """Run a client command; the exit status is 0 on success, 1 on an error answer or a job that
    did not succeed (fit --wait, wait), 2 on a usage error, 130 on Ctrl-C. Each error is one
    line on stderr (a problem's fields follow it, one line each)."""
    try:
        if args.command == "history" and args.plot is not None and args.max_points is not None:
            raise UsageError("--max-points thins the JSON history; a --plot is always thinned")
        if args.command == "history" and args.plot is None and args.log:
            raise UsageError("--log draws a --plot's loss on a log scale; add --plot FILE")
        if args.command == "fit" and not args.wait and args.progress:
            raise UsageError("--progress shows how a --wait goes; add --wait")
        if args.command == "predict" and args.coverage is None and args.method is not None:
            raise UsageError(
                "--method chooses how a --coverage interval is computed; add --coverage"
            )
        if args.command == "models" and args.serve is None and _canary_options(args):
            raise UsageError(
                "--traffic, --promote-after and --max-worse start a canary; add --serve"
            )
        headers = _headers()
    except UsageError as exc:
        print(f"sgd-service {args.command}: error: {exc}", file=sys.stderr)
        return 2
    with httpx.Client(base_url=args.url, timeout=CLIENT_TIMEOUT, headers=headers) as http:
        sgd = SGDClient(http)
        try:
            return COMMANDS[args.command](sgd, args)
        except ProblemError as exc:
            print(f"error: {exc.problem.title}: {exc.detail}", file=sys.stderr)
            for issue in exc.problem.errors or []:
                print(f"  {issue.field}: {issue.message}", file=sys.stderr)
        except ClientError as exc:
            print(f"error: {args.url}: {exc}", file=sys.stderr)
        except OSError as exc:  # --plot's file: a missing directory, a directory, no permission
            print(f"error: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return 1


def _fit(sgd: SGDClient, args: argparse.Namespace) -> int:
    # Only what was given is sent: the service's defaults are the tutorial's.
    options: FitOptions = {}
    for name in (
        "epochs",
        "learning_rate",
        "init_w",
        "fit_intercept",
        "seed",
        "validation_fraction",
        "n_iter_no_change",
        "publish",
        "init_from",
    ):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    # None is a value of these two (every sample; no early stopping): absent means not given
    if hasattr(args, "batch_size"):
        options["batch_size"] = args.batch_size
    if hasattr(args, "tol"):
        options["tol"] = args.tol
    job = sgd.fit(args.x, args.y, **options)
    if not args.wait:
        print(job.model_dump_json(indent=2))
        return 0
    # The id first: whatever happens to this wait, the caller knows which job is theirs.
    print(f"job {job.id} {job.status.value}; waiting (Ctrl-C cancels it)", file=sys.stderr)
    try:
        ended = _wait_showing(sgd, job.id, args)
    except KeyboardInterrupt:
        return _cancel_on_interrupt(sgd, job.id)
    return _report(ended, args)


def _wait(sgd: SGDClient, args: argparse.Namespace) -> int:
    """A job started elsewhere: Ctrl-C stops this wait, not the job (it may be someone else's)."""
    try:
        ended = _wait_showing(sgd, args.job_id, args)
    except KeyboardInterrupt:
        print(
            f"interrupted: stopped waiting; job {args.job_id} goes on "
            f"(POST /jobs/{args.job_id}/cancel cancels it)",
            file=sys.stderr,
        )
        return 130
    return _report(ended, args)


def _for_a_person(args: argparse.Namespace) -> bool:
    """Whether a wait ends with a line for a person (stdout is a terminal and --json was not
    given) rather than the job as JSON, exactly as a program has always read it."""
    return sys.stdout.isatty() and not args.json


def _wait_showing(sgd: SGDClient, job_id: str, args: argparse.Namespace) -> Job:
    """Wait for the job; the bar goes to stderr (where tqdm draws, beside the messages) when a
    person reads stdout, or with --progress."""
    shown = args.progress or _for_a_person(args)
    return sgd.wait(job_id, timeout=args.timeout, progress=sys.stderr if shown else False)


def _report(job: Job, args: argparse.Namespace) -> int:
    """The ended job: its last line for a person, else its JSON; 0 if it succeeded, else 1."""
    print(outcome(job) if _for_a_person(args) else job.model_dump_json(indent=2))
    return 0 if job.status == JobStatus.succeeded else 1


def outcome(job: Job) -> str:
    """An ended job in one line: succeeded with its model version, failed with the problem's
    title and detail, or cancelled."""
    if job.status == JobStatus.succeeded and job.result is not None:
        result = job.result
        line = f"succeeded: model version {result.model_version} (w={result.w:.6g}"
        line += f", b={result.b:.6g})" if job.params.fit_intercept else ")"
        if not result.published:
            line += f", not served: {result.not_published_because}"
        return line
    if job.status == JobStatus.failed and job.error is not None:
        return f"failed: {job.error.title}: {job.error.detail}"
    return job.status.value


def _cancel_on_interrupt(sgd: SGDClient, job_id: str) -> int:
    """Ctrl-C during fit --wait: the job was ours to wait for, so it is cancelled too."""
    try:
        sgd.cancel(job_id)
        print(f"interrupted: job {job_id} cancelled", file=sys.stderr)
    except (ClientError, KeyboardInterrupt) as exc:
        reason = "a second Ctrl-C" if isinstance(exc, KeyboardInterrupt) else str(exc)
        print(
            f"interrupted: job {job_id} was not cancelled ({reason}); "
            f"cancel it with POST /jobs/{job_id}/cancel",
            file=sys.stderr,
        )
    return 130


def _batch_size(text: str) -> int | None:
    if text == "all":
        return None  # every sample each epoch: full-batch gradient descent
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a number of samples or 'all', not {text!r}")
    return int(text)


def _tol(text: str) -> float | None:
    if text == "off":
        return None  # no early stopping (sent as null)
    return _finite(text)


PUBLISH: tuple[Publish, ...] = ("always", "never", "if_better")


def _init_from(text: str) -> Literal["served"] | int:
    if text == "served":
        return "served"
    try:
        return _version(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"'served' or a model version number (1, 2, ...), not {text!r}"
        ) from None


def _coverage(text: str) -> float:
    value = _finite(text)
    if not MIN_COVERAGE <= value <= MAX_COVERAGE:
        raise argparse.ArgumentTypeError(
            f"a probability from {MIN_COVERAGE:g} to {MAX_COVERAGE:g} (0.9 for 90%), not {text!r}"
        )
    return value


def _caller_key(text: str) -> str:
    """A --key an HTTP header can carry as it is (X-Caller-Key)."""
    if not (text and text.isascii() and text.isprintable() and text == text.strip()):
        raise argparse.ArgumentTypeError(
            f"a key is visible ASCII without spaces at its ends (an HTTP header), not {text!r}"
        )
    return text


def _predict(sgd: SGDClient, args: argparse.Namespace) -> int:
    hours: list[float] = args.hours
    if args.coverage is not None:
        return _predict_intervals(sgd, args)
    if len(hours) == 1:
        scores = [sgd.predict(hours[0], args.version, key=args.key)]
    else:
        scores = sgd.predict_many(hours, args.version, key=args.key)
    for score in scores:
        print(score)
    return 0


def _predict_intervals(sgd: SGDClient, args: argparse.Namespace) -> int:
    """One line per hours value: `8.01 [7.5, 8.5] (90% conformal)`, the score first as without
    --coverage; `[unbounded]` when the version's held-out rows are too few for that coverage."""
    hours: list[float] = args.hours
    options = {"method": args.method, "version": args.version, "key": args.key}
    rows: list[tuple[float, float | None, float | None]]
    if len(hours) == 1:
        one = sgd.predict_interval(hours[0], args.coverage, **options)
        assert one.interval is not None  # the client refuses an answer without it
        rows = [(one.score, one.interval.lower, one.interval.upper)]
        method = one.interval.method
    else:
        many = sgd.predict_many_intervals(hours, args.coverage, **options)
        assert many.method is not None  # the client refuses an answer without it
        unbounded: list[float | None] = [None] * len(many.scores)
        lower, upper = many.lower or unbounded, many.upper or unbounded
        rows = list(zip(many.scores, lower, upper, strict=True))
        method = many.method
    for score, low, high in rows:
        bounds = "unbounded" if low is None or high is None else f"{low}, {high}"
        print(f"{score} [{bounds}] ({args.coverage * 100:g}% {method})")
    return 0


def _version(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a model version number (1, 2, ...), not {text!r}")
    return int(text)


def _traffic(text: str) -> int:
    if not text.isdigit() or int(text) > 100:
        raise argparse.ArgumentTypeError(f"a percent of predictions, 0..100, not {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a number of outcomes (1, 2, ...), not {text!r}")
    return int(text)


def _share(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a share >= 0 (0.05 for 5%), not {text!r}")
    return value


def _canary_options(args: argparse.Namespace) -> bool:
    """Whether `models` was given --traffic, --promote-after or --max-worse."""
    return any(v is not None for v in (args.traffic, args.promote_after, args.max_worse))


def _models(sgd: SGDClient, args: argparse.Namespace) -> int:
    if args.serve is not None:
        # the client sends only the canary options given: none, and it serves as it always has
        served = sgd.serve(
            args.serve,
            traffic=args.traffic,
            promote_after=args.promote_after,
            max_worse=args.max_worse,
        )
        print(served.model_dump_json())
    elif args.rollback is not None:
        print(sgd.rollback(args.rollback).model_dump_json())
    else:
        print(sgd.models(args.limit).model_dump_json())
    return 0


def _outcomes(sgd: SGDClient, args: argparse.Namespace) -> int:
    receipt = sgd.record_outcomes(
        args.hours,
        args.score,
        prediction_id=args.prediction_id,
        model_version=args.model_version,
    )
    print(receipt.model_dump_json())
    return 0


def _history(sgd: SGDClient, args: argparse.Namespace) -> int:
    if args.plot is None:
        print(sgd.history(args.job_id, max_points=args.max_points).model_dump_json())
        return 0
    image_format = PLOT_FORMATS[args.plot.suffix.lower()]
    args.plot.write_bytes(sgd.plot(args.job_id, image_format, log=args.log))
    scale = ", log scale" if args.log else ""
    print(f"wrote {args.plot} ({image_format}{scale})")
    return 0


def _scopes(text: str) -> tuple[Scope, ...]:
    scopes = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise argparse.ArgumentTypeError(
            f"scopes are a comma-separated list of {', '.join(SCOPES)}, not {text!r}"
        )
    return scopes  # type: ignore[return-value]


def new_token(name: str, scopes: tuple[Scope, ...]) -> int:
    """A random 256-bit token on stdout's first line; its SGD_TOKENS_FILE entry on the next."""
    try:
        NamedToken(name=name, sha256="0" * 64, scopes=scopes)
    except ValidationError:
        print(
            f"sgd-service: error: a token's name is letters, digits, '_.-': {name!r}",
            file=sys.stderr,
        )
        return 2
    secret = secrets.token_urlsafe(32)
    entry = {"name": name, "sha256": digest(secret).hex(), "scopes": list(scopes)}
    print(secret)
    print(json.dumps(entry))
    return 0


COMMANDS = {
    "fit": _fit,
    "wait": _wait,
    "predict": _predict,
    "outcomes": _outcomes,
    "history": _history,
    "models": _models,
}


def parser() -> Parser:
    """Every command: serve (the default), worker, token, and the client commands."""
    top = Parser(
        prog="sgd-service",
        description="serve (the default), or fit, predict and history against a running service "
        "(--url, default $SGD_URL, else SGD_HOST and SGD_PORT as `serve` reads them)",
    )
    sub = top.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the service (the default); configured by SGD_* env")
    worker = sub.add_parser(
        "worker", help="run a training worker on the shared queue (needs SGD_REDIS_URL)"
    )
    worker.add_argument(
        "--health-file",
        type=Path,
        help="touch this file every 2 s while Redis answers (for a container's healthcheck)",
    )
    token = sub.add_parser(
        "token", help="make a new token: prints it, and its line for SGD_TOKENS_FILE"
    )
    token.add_argument("--name", required=True, help="who or what holds it (e.g. dashboard)")
    token.add_argument(
        "--scopes",
        type=_scopes,
        required=True,
        help=f"comma-separated, of {', '.join(SCOPES)}",
    )
    add_client_commands(sub)
    return top


def settings_to_start() -> Settings:
    """The settings `serve` and `worker` start with; exits with 2 and the reason if they are
    wrong (an unknown value, an unreadable SGD_TOKENS_FILE), before anything starts."""
    try:
        settings = load_settings()
        if settings.tokens_file is not None:
            read_tokens(settings.tokens_file)
    except (SettingsError, TokensFileError) as exc:
        print(f"sgd-service: cannot start: {exc}", file=sys.stderr)
        sys.exit(2)
    return settings
