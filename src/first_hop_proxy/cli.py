"""The ``first-hop-proxy`` command: serve, init, check-config, rewrite."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from . import __version__, console
from .config import ConfigError, LoadedConfig, load_config
from .config_file import (
    FILE_NAME,
    find_config,
    shown,
    user_config_file,
    write_starter_config,
)
from .config_view import effective_config
from .demo import banner
from .logs.error_log import log_config_error
from .redact import Redactor, redact_text
from .rewrite import trial
from .server import RunningServer, event_loop_name, run
from .state import STATE, configured_secrets

log = logging.getLogger("first_hop_proxy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="first-hop-proxy",
        description="A fast, resilient OpenAI-compatible proxy for SillyTavern.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command")

    # The options are accepted before and after the command; a subcommand's
    # defaults are suppressed so they never undo a value given before it.
    def options(p: argparse.ArgumentParser, default: Any, serving: bool) -> None:
        p.add_argument(
            "--config",
            type=Path,
            default=default,
            help="config file (default: $FHP_CONFIG, else ./config.yaml, else "
            f"{shown(user_config_file())})",
        )
        if serving:
            p.add_argument(
                "--host", default=default, help="address to listen on (overrides server.host)"
            )
            p.add_argument(
                "--port",
                type=port_number,
                default=default,
                help="port to listen on (overrides server.port)",
            )
            p.add_argument(
                "--no-uvloop",
                action="store_true",
                default=False if default is None else default,
                help="use asyncio's own event loop even when uvloop is installed",
            )

    options(parser, None, True)
    serve_parser = commands.add_parser("serve", help="start the proxy (the default)")
    options(serve_parser, argparse.SUPPRESS, True)
    init = commands.add_parser("init", help="write the commented starter config")
    init.add_argument(
        "path",
        nargs="?",
        type=Path,
        help=f"where to write it (default: {shown(user_config_file())})",
    )
    check = commands.add_parser(
        "check-config", help="validate the config and print it with secrets masked"
    )
    options(check, argparse.SUPPRESS, False)
    rewrite = commands.add_parser(
        "rewrite", help="show what the rewrite rules do to a text, rule by rule"
    )
    options(rewrite, argparse.SUPPRESS, False)
    rewrite.add_argument(
        "--role",
        default="user",
        choices=("user", "assistant", "system", "tool", "developer"),
        help="the message role whose regex_replacement rules apply (default: user)",
    )
    rewrite.add_argument(
        "--response",
        action="store_true",
        help="apply the response_processing rules (reply text) instead",
    )
    rewrite.add_argument("text", help="the text to rewrite")
    return parser


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (use 1-65535)")
    return port


def load_or_report(
    path: Path | None,
    host: str | None = None,
    port: int | None = None,
    *,
    log_errors: bool = False,
) -> LoadedConfig | None:
    """Load the config (``--host``/``--port`` win over everything), or print why not.

    ``log_errors``: also write the problems to a ``config_error`` error log.
    """
    env = config_env(host, port)
    try:
        return load_config(path, env)
    except ConfigError as exc:
        print(f"Config error in {exc.source}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {redact_text(problem)}", file=sys.stderr)
        for warning in exc.warnings:
            print(f"  warning: {redact_text(warning)}", file=sys.stderr)
        if log_errors:
            written = record_config_error(find_config(path, env).path, exc)
            if written is not None:
                print(f"  (logged to {written})", file=sys.stderr)
        return None


def config_env(host: str | None = None, port: int | None = None) -> dict[str, str]:
    """The environment a config is loaded with: ``--host``/``--port`` win over everything."""
    env = dict(os.environ)
    if host is not None:
        env["FHP_HOST"] = host
    if port is not None:
        env["FHP_PORT"] = str(port)
    return env


def record_config_error(path: Path | None, exc: ConfigError) -> Path | None:
    """Best effort: a broken config's problems go to ``logs/errors`` beside the config file.

    The config's own ``error_logging`` cannot be trusted when it is broken, so the
    default folder is used; nothing is written for a config file that does not exist.
    """
    try:
        if path is None or not path.is_file():
            return None
        folder = path.resolve().parent / "logs" / "errors"
    except OSError:
        return None
    return log_config_error(folder, exc.problems, source=exc.source)


def check_config(path: Path | None) -> int:
    loaded = load_or_report(path)
    if loaded is None:
        return 1
    print(f"# effective config from {config_source(loaded)}")
    print(yaml.safe_dump(effective_config(loaded), sort_keys=False, allow_unicode=True), end="")
    if loaded.demo:
        print(banner(loaded), file=sys.stderr)
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"OK: config is valid ({len(loaded.warnings)} warning(s))", file=sys.stderr)
    return 0


def config_source(loaded: LoadedConfig) -> str:
    """The config file in use, for the banner and ``check-config``."""
    if loaded.path is None:
        return "no config file (demo mode, built-in defaults)"
    return shown(loaded.path)


def init_config(path: Path | None) -> int:
    """``first-hop-proxy init [PATH]``: write the starter config, never over a file."""
    target = path if path is not None else user_config_file()
    try:
        write_starter_config(target)
    except FileExistsError:
        print(
            f"{shown(target)} already exists; nothing was written. Edit it, or name "
            "another file: first-hop-proxy init PATH",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"cannot write {shown(target)}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"Wrote the starter config to {shown(target)}")
    print("Next: open it, set target_proxy.url to your AI proxy's chat completions URL")
    print("(and your key under target_proxy.headers, or set FHP_TARGET_API_KEY), then run:")
    found = find_config(None).path
    if found is not None and shown(found) == shown(target):  # found without --config
        print("  first-hop-proxy")
    else:
        print(f'  first-hop-proxy --config "{shown(target)}"')
    return 0


def serve(path: Path | None, host: str | None, port: int | None, use_uvloop: bool = True) -> int:
    loaded = load_or_report(path, host, port, log_errors=True)
    if loaded is None:
        return 1
    env = config_env(host, port)
    # In demo mode (no file anywhere) a config.yaml made in this folder is picked up.
    watched = loaded.path or path or Path(FILE_NAME)
    host, port = loaded.config.server.host, loaded.config.server.port
    handler = console.setup(loaded.config.server.debug, Redactor(configured_secrets(loaded.config)))
    try:
        return run_server(
            loaded, host, port, (watched, lambda: load_config(watched, env)), use_uvloop
        )
    finally:
        handler.close()


def run_server(
    loaded: LoadedConfig,
    host: str,
    port: int,
    reload: tuple[Path, Callable[[], LoadedConfig]] | None = None,
    use_uvloop: bool = True,
) -> int:
    for warning in loaded.warnings:
        log.warning("config: %s", warning)

    def ready(running: RunningServer) -> None:
        log.info("config: %s", config_source(loaded))
        if loaded.demo:
            log.warning(banner(loaded))
        log.info(
            "first-hop-proxy %s listening on %s (event loop: %s)",
            __version__,
            running.url,
            event_loop_name(),
        )
        log.info("SillyTavern: set the API URL to %s/v1", running.url)
        log.info("dashboard: %s/", running.url)
        access = running.runner.app[STATE].access
        if access.generated:
            # Printed once, on purpose: it is the only way the person learns it.
            log.warning(
                "admin token for the dashboard, /metrics and /logs (new at each start; "
                "set server.admin_token to keep one): %s",
                access.admin_token,
            )

    try:
        run(loaded, host, port, on_ready=ready, reload=reload, use_uvloop=use_uvloop)
    except OSError as exc:
        log.error(
            "cannot listen on %s:%s: %s (is another proxy already running there? "
            "use --port or server.port to pick another port)",
            host,
            port,
            exc.strerror or exc,
        )
        return 1
    except KeyboardInterrupt:
        pass
    log.info("stopped")
    return 0


def try_rules(path: Path | None, text: str, role: str, response: bool) -> int:
    """``first-hop-proxy rewrite``: check a rule on a text before trusting a chat to it."""
    loaded = load_or_report(path)
    if loaded is None:
        return 1
    print(trial(loaded.config, text, role=role, response=response))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "init":
        return init_config(args.path)
    if args.command == "check-config":
        return check_config(args.config)
    if args.command == "rewrite":
        return try_rules(args.config, args.text, args.role, args.response)
    return serve(args.config, args.host, args.port, use_uvloop=not args.no_uvloop)


if __name__ == "__main__":
    sys.exit(main())
