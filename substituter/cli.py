"""The `substituter` command line: daemon, fetch, status, plugins, fetcher."""

from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .config import Config, load_config
from .errors import ConfigError, PluginError, SubstituterError

if TYPE_CHECKING:
    from .store.daemon_client import StartedDaemon

# Exit codes: 0 success, 1 something failed (named), 2 usage or configuration errors.
EXIT_FAILED = 1
EXIT_USAGE = 2


def _setup_logging(level: str) -> None:
    # journald adds timestamps; a terminal user wants them short.
    fmt = "%(levelname)s %(name)s: %(message)s" if not sys.stderr.isatty() else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stderr)


def _load(config_file: str | None) -> Config:
    try:
        return load_config(config_file)
    except ConfigError as exc:
        raise click.UsageError(f"bad configuration: {exc}") from exc


@click.group()
@click.version_option(__version__, prog_name="substituter")
def main() -> None:
    """A pluggable, verifying external substituter for Nix."""


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML config (or JSON if it ends in .json); defaults are used without one.")
@click.option("--check-config", is_flag=True, help="Validate the configuration and exit.")
def daemon(config_file: str | None, check_config: bool) -> None:
    """Run the HTTP endpoint for Nix, the broker and the fetchers."""
    config = _load(config_file)
    from .daemon import Daemon
    from .runtime import build_fetchers

    try:
        if check_config:
            build_fetchers(config)  # validates every fetcher's options too
            click.echo(f"configuration OK: {len(config.fetchers)} fetcher(s), listen {config.listen}")
            return
        _setup_logging(config.log_level)
        from .memory import tune_malloc

        tune_malloc()  # before any worker thread exists (arenas are made per thread)
        Daemon(config).run()
    except (ConfigError, PluginError) as exc:
        raise click.UsageError(f"bad configuration: {exc}") from exc
    except SubstituterError as exc:
        click.echo(f"substituter daemon: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    except OSError as exc:
        click.echo(f"substituter daemon: {exc}", err=True)
        sys.exit(EXIT_FAILED)


@main.command()
def plugins() -> None:
    """List installed fetcher plugins, their options and where they come from."""
    from .plugin import available_fetcher_types, describe_options, load_fetcher_type

    eps = available_fetcher_types()
    if not eps:
        click.echo("no fetcher plugins installed")
        return
    for kind, ep in sorted(eps.items()):
        dist = ep.dist
        origin = f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"
        try:
            cls = load_fetcher_type(kind)
        except SubstituterError as exc:
            click.echo(f"{kind}  ({origin})\n  failed to load: {exc}\n")
            continue
        summary = (cls.__doc__ or "").strip().splitlines()[0:1]
        click.echo(f"{kind}  ({origin}; {ep.value})")
        if summary:
            click.echo(f"  {summary[0]}")
        if cls.schemes:
            click.echo(f"  opens: {', '.join(cls.schemes)}")
        for opt in describe_options(cls.Options):
            line = f"  --option {opt.name}=<{opt.type}>  default {opt.default}"
            click.echo(line + (f"\n      {opt.help}" if opt.help else ""))
        click.echo("")


def _parse_option_pairs(pairs: tuple[str, ...]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--option expects KEY=VALUE, got {pair!r}")
        options[key] = value
    return options


@main.command()
@click.argument("kind")
@click.option("--dataspace", "address", required=True,
              help='Dataspace address: <unix "/path">, unix:/path, or 127.0.0.1:PORT.')
@click.option("--cap", required=True, help="Capability (sturdy ref text), or @FILE to read it from a file.")
@click.option("--name", default=None, help="Fetcher name (default: KIND@HOST).")
@click.option("--priority", type=int, default=None, help="Rank among fetchers; lower is preferred.")
@click.option("--locate-timeout", type=float, default=5.0, show_default=True)
@click.option("--option", "option_pairs", multiple=True, metavar="KEY=VALUE", help="A plugin option.")
@click.option("--store-dir", default="/nix/store", show_default=True)
def fetcher(kind: str, address: str, cap: str, name: str | None, priority: int | None,
            locate_timeout: float, option_pairs: tuple[str, ...], store_dir: str) -> None:
    """Run one fetcher plugin in its own process, attached to a dataspace."""
    from .plugin import DataspaceLink, FetcherContext, load_fetcher_type, parse_options
    from .remote import run_remote_fetcher

    _setup_logging("info")
    cap = _read_cap(cap)
    _check_dataspace(address, cap)
    try:
        cls = load_fetcher_type(kind)
        options = parse_options(cls.Options, _parse_option_pairs(option_pairs), f"fetcher {kind}")
    except SubstituterError as exc:
        raise click.UsageError(str(exc)) from exc
    import socket

    context = FetcherContext(store_dir=store_dir, dataspace=DataspaceLink())
    instance = cls(name or f"{kind}@{socket.gethostname()}", options, context, priority=priority)
    sys.exit(run_remote_fetcher(instance, address, cap, locate_timeout=locate_timeout))


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None)
@click.option("--dataspace", "address", default=None, help="Dataspace address (default: the daemon's socket).")
@click.option("--cap", default=None, help="Capability, or @FILE (default: the daemon's dataspace.cap).")
@click.option("--watch", is_flag=True, help="Keep showing changes until interrupted.")
def status(config_file: str | None, address: str | None, cap: str | None, watch: bool) -> None:
    """Show live demand, supply, transfers and recent failures from the dataspace."""
    from .status import run_status

    config = _load(config_file)
    address, cap = _dataspace_access(config, address, cap)
    _check_dataspace(address, cap)
    sys.exit(run_status(address, cap, watch=watch))


def _read_cap(cap: str) -> str:
    """The capability text itself, or read from FILE when given as @FILE."""
    if not cap.startswith("@"):
        return cap
    try:
        return Path(cap[1:]).read_text().strip()
    except OSError as exc:
        raise click.UsageError(f"cannot read the capability file {cap[1:]}: {exc.strerror}") from exc


def _check_dataspace(address: str, cap: str) -> None:
    """A malformed address or capability is a usage error (exit 2), not a crash inside the actor."""
    from .dataspace.connect import parse_address, parse_capability

    try:
        parse_address(address)
        parse_capability(cap)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


def _dataspace_access(config: Config, address: str | None, cap: str | None) -> tuple[str, str]:
    if address is None:
        address = config.dataspace.connect or f'<unix "{config.dataspace_socket}">'
    if cap is None:
        if config.dataspace.cap:
            cap = config.dataspace.cap
        else:
            cap_file = config.dataspace.cap_file or config.dataspace_socket.with_name("dataspace.cap")
            try:
                cap = cap_file.read_text().strip()
            except OSError as exc:
                raise click.UsageError(
                    f"cannot read the dataspace capability {cap_file}: {exc.strerror} "
                    "(is the daemon running? pass --cap)"
                ) from exc
    else:
        cap = _read_cap(cap)
    return address, cap


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None)
@click.option("--store", "store_spec", default="daemon", show_default=True,
              help="daemon, unix://SOCKET, or a directory (a chroot store, imported with nix-store).")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=8, show_default=True,
              help="NARs downloaded at once.")
@click.option("--require-sigs/--no-require-sigs", default=True, show_default=True,
              help="Refuse input-addressed paths without a signature from a trusted key.")
@click.option("--dataspace", "address", default=None,
              help="Attach to a running daemon's dataspace (or a syndicate-server) and use its fetchers.")
@click.option("--cap", default=None, help="Capability for --dataspace, or @FILE (default: the daemon's).")
def fetch(paths: tuple[str, ...], config_file: str | None, store_spec: str, jobs: int,
          require_sigs: bool, address: str | None, cap: str | None) -> None:
    """Fetch the closures of PATHS (store paths or hash parts), verified, into a Nix store.

    By default the configured fetchers run in this process.  With --dataspace the demand goes to
    a running daemon's dataspace and its fetchers answer (plus any configured with --config);
    verification and trust stay here, with this config's trusted-public-keys.
    """
    program = _is_program()
    if program:
        # Importing and setting up allocate objects that live as long as the process: the
        # cyclic GC would trace them again and again (15-30 ms of a one-off fetch).  It is off
        # until the imports are done, see _fetch.
        gc.disable()
    from .fetch import start_store

    # A chroot store's own nix-daemon starts first: it comes up while the config is read and
    # the broker's modules are imported.
    try:
        started = start_store(store_spec)
    except SubstituterError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    try:
        code = _fetch(paths, config_file, store_spec, jobs, require_sigs, address, cap, started,
                      gc_paused=program)
    finally:
        if started is not None:
            started.kill()  # only does something when nothing attached to it
    if program:
        # Nothing is left to clean up (the store is closed, every task and worker done): skip
        # the interpreter's teardown of every imported module (~25 ms of a one-off fetch).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _is_program() -> bool:
    """Run as the `substituter` program (not called in-process, e.g. by click's test runner)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    return argv0 is not None and (argv0.name == "substituter" or argv0 == Path(__file__).with_name("__main__.py"))


def _fetch(paths: tuple[str, ...], config_file: str | None, store_spec: str, jobs: int,
           require_sigs: bool, address: str | None, cap: str | None, started: StartedDaemon | None,
           *, gc_paused: bool = False) -> int:
    import dataclasses

    from .fetch import parse_targets, run_fetch

    config = _load(config_file)
    if gc_paused:
        # Imported now what the fetch itself would import, and set aside for good (never traced
        # again); the fetch's own garbage (~35 cyclic objects a path) is collected every 10,000
        # allocations rather than every 700.
        from . import runtime, trust  # noqa: F401

        gc.freeze()
        gc.set_threshold(10_000, 10, 10)
        gc.enable()
    if address is not None or cap is not None:
        address, cap = _dataspace_access(config, address, cap)
        _check_dataspace(address, cap)
        config = dataclasses.replace(
            config,
            dataspace=dataclasses.replace(config.dataspace, connect=address, cap=cap),
            fetchers=config.fetchers if config_file is not None else (),
        )
    _setup_logging("warning" if config.log_level == "info" else config.log_level)
    try:
        targets = parse_targets(paths, config.store_dir)
    except SubstituterError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        return run_fetch(config, targets, store_spec, jobs=jobs, require_sigs=require_sigs, started=started)
    except (ConfigError, PluginError) as exc:
        raise click.UsageError(f"bad configuration: {exc}") from exc


@main.command("eris", context_settings={"ignore_unknown_options": True, "help_option_names": []},
              add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def eris(args: tuple[str, ...]) -> None:
    """ERIS: publish binary caches as encrypted blocks, and serve them (`eris --help`)."""
    # Imported on use: the ERIS tools pull in aiohttp's server and the codec.
    from fetchers.eris.cli import eris_group

    eris_group.main(list(args), prog_name="substituter eris", standalone_mode=True)
