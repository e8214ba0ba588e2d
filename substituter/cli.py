"""The `substituter` command line."""

from __future__ import annotations

import sys

import click

from . import __version__


@click.group()
@click.version_option(__version__, prog_name="substituter")
def main() -> None:
    """A pluggable, verifying external substituter for Nix."""


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None)
@click.option("--check-config", is_flag=True, help="Validate the configuration and exit.")
def daemon(config_file: str | None, check_config: bool) -> None:
    """Run the HTTP endpoint for Nix, the broker and the fetchers."""
    click.echo("substituter daemon: not implemented yet", err=True)
    sys.exit(1)
