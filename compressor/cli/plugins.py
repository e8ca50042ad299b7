"""``plugins``: list the installed methods and input formats, or show one method."""

from __future__ import annotations

import json
import re

import click

from compressor.method import KINDS, VERBS


def plain_text(doc: str) -> str:
    """A docstring without reStructuredText markup: ``x`` and :role:`x` become x."""
    doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc)
    return re.sub(r"``([^`]+)``", r"\1", doc)


def register(cli):
    @cli.group(invoke_without_command=True)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_context
    def plugins(ctx, as_json):
        """List installed methods and input formats."""
        if ctx.invoked_subcommand is not None:
            return
        from compressor.registry import get_registry

        reg = get_registry()
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "methods": [
                            {**m.describe(), "plugin": reg.method_plugins[key]}
                            for key, m in sorted(reg.methods.items())
                        ],
                        "sources": [{"name": r.name, "summary": r.summary} for r in reg.readers],
                    },
                    indent=2,
                    sort_keys=True,
                )
            )
            return
        width = max((len(n) for n, _ in reg.methods), default=0)
        for (name, _), method in sorted(reg.methods.items()):
            click.echo(f"{name:<{width}}  {method.kind:<8}  {method.summary}")
        empty = [VERBS[k] for k in KINDS if not any(m.kind == k for m in reg.methods.values())]
        if empty:
            click.echo(
                "\nNo installed method for: "
                + ", ".join(f"compress {v}" for v in empty)
                + " (a plugin can add one)"
            )
        click.echo("\nInput formats: " + ", ".join(r.name for r in reg.readers))

    @plugins.command()
    @click.argument("name")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def show(name, as_json):
        """Show one method: what it does, its reference and its options."""
        from compressor.registry import get_registry

        reg = get_registry()
        reg.method(name)  # an unknown name: one clear line naming those there are
        methods = reg.named(name)
        if as_json:
            docs = [{**m.describe(), "plugin": reg.method_plugins[name, m.kind]} for m in methods]
            click.echo(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2, sort_keys=True))
            return
        for i, method in enumerate(methods):
            if i:
                click.echo("")
            _show(method, reg.method_plugins[name, method.kind])


def _show(method, plugin: str) -> None:
    click.echo(f"{method.name} ({method.kind}, version {method.version}, from plugin {plugin})")
    click.echo(f"  {method.summary}")
    if method.reference:
        click.echo(f"  Reference: {method.reference}")
    if method.needs_base:
        click.echo("  Needs --base BASE.")
    doc = plain_text((type(method).__doc__ or "").strip())
    if doc:
        click.echo("")
        for line in doc.splitlines():
            click.echo(f"  {line.strip()}")
    click.echo(f"\nExample:\n  {method.example()}")
    click.echo("\nOptions:" if method.options else "\nOptions: none")
    for o in method.options:
        kind = "|".join(o.choices) if o.choices else o.type
        click.echo(f"  -o {o.name} {kind}  (default {o.default})")
        click.echo(f"      {o.help}")
