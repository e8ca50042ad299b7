"""Regenerate the generated parts of README.md: the CLI reference and the plugin example.

python scripts/gen_readme.py          # rewrite README.md
python scripts/gen_readme.py --check  # exit 1 if README.md is stale (the tests do this)
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLE = ROOT / "tests" / "plugin_example" / "compressor_scale.py"


def _help_sections(cmd: click.Command, ctx: click.Context) -> list[str]:
    out = [f"### `{ctx.command_path}`\n\n```\n{cmd.get_help(ctx).rstrip()}\n```\n"]
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            sub = cmd.commands[name]
            sub_ctx = click.Context(
                sub, info_name=name, parent=ctx, terminal_width=88, max_content_width=88
            )
            out.extend(_help_sections(sub, sub_ctx))
    return out


def cli_reference() -> str:
    from compressor.cli import cli

    ctx = click.Context(cli, info_name="compress", terminal_width=88, max_content_width=88)
    return "\n".join(_help_sections(cli, ctx))


def plugin_example() -> str:
    return "```python\n" + EXAMPLE.read_text().rstrip() + "\n```"


def render(text: str) -> str:
    """README text with every generated section brought up to date."""
    for mark, body in (("cli-reference", cli_reference()), ("plugin-example", plugin_example())):
        start, end = f"<!-- {mark} -->", f"<!-- /{mark} -->"
        a, b = text.index(start) + len(start), text.index(end)
        text = text[:a] + "\n" + body.rstrip() + "\n" + text[b:]
    return text


def main() -> None:
    current = README.read_text()
    fresh = render(current)
    if "--check" in sys.argv:
        if fresh != current:
            sys.exit("README.md is stale: run python scripts/gen_readme.py")
        return
    README.write_text(fresh)


if __name__ == "__main__":
    main()
