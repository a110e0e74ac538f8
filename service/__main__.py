"""`python -m service` / `sgd-service`: serve (the default), or fit, predict and history against
a running service (--url, default $SGD_URL, else SGD_HOST and SGD_PORT as `serve` reads them)."""

import sys
from collections.abc import Sequence
from pathlib import Path

from service.cli import Parser, _new_token, _scopes, add_client_commands, run_client_command
from service.core.logs import configure_logging
from service.core.settings import SettingsError, load_settings
from service.http.access import SCOPES, TokensFileError, read_tokens
from service.server import serve


def main(argv: Sequence[str] | None = None) -> None:
    """The `sgd-service` command."""
    parser = Parser(prog="sgd-service", description=__doc__)
    sub = parser.add_subparsers(dest="command")
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
    args = parser.parse_args(argv)
    if args.command == "token":
        sys.exit(_new_token(args.name, args.scopes))
    if args.command in (None, "serve", "worker"):
        try:
            settings = load_settings()
            if settings.tokens_file is not None:
                read_tokens(settings.tokens_file)
        except (SettingsError, TokensFileError) as exc:
            print(f"sgd-service: cannot start: {exc}", file=sys.stderr)
            sys.exit(2)
        if args.command == "worker":
            from service.runner import queue_worker

            configure_logging(settings.log_level)
            queue_worker.main(settings, health_file=args.health_file)
        else:
            serve(settings)
        return
    sys.exit(run_client_command(args))


if __name__ == "__main__":
    main()
