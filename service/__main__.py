"""`python -m service` / `sgd-service`: the command line (service.cli) dispatched, importing only
what the command needs: the worker never imports the web server, the client commands neither."""

import sys
from collections.abc import Sequence

from service import cli
from service.core.logs import configure_logging


def main(argv: Sequence[str] | None = None) -> None:
    """The `sgd-service` command."""
    args = cli.parser().parse_args(argv)
    if args.command == "token":
        sys.exit(cli.new_token(args.name, args.scopes))
    if args.command not in (None, "serve", "worker"):
        sys.exit(cli.run_client_command(args))
    settings = cli.settings_to_start()
    if args.command == "worker":
        from service.runner import queue_worker

        configure_logging(settings.log_level)
        queue_worker.main(settings, health_file=args.health_file)
    else:
        from service.server import serve

        serve(settings)


if __name__ == "__main__":
    main()
