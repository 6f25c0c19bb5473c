"""`edgeprune` commands: shell completion. Each command's flags sit beside its handler."""

from __future__ import annotations

import argparse
import sys


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """A bash (or zsh, through bashcompinit) completion function for every subcommand and flag."""
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, sp in sorted(subs.choices.items()):
        words = sorted({o for a in sp._actions for o in a.option_strings if o.startswith("--")})
        nested = next((a for a in sp._actions if isinstance(a, argparse._SubParsersAction)), None)
        words += sorted(nested.choices) if nested else []
        cases.append(f'    {name}) words="{" ".join(words)}" ;;')
    script = "\n".join(
        [
            '# edgeprune completion: eval "$(edgeprune completion %s)"' % shell,
            "_edgeprune() {",
            '  local cur="${COMP_WORDS[COMP_CWORD]}" cmd="${COMP_WORDS[1]}" words',
            '  if [ "$COMP_CWORD" -eq 1 ]; then',
            f'    COMPREPLY=($(compgen -W "{" ".join(sorted(subs.choices))} --help --version" -- "$cur")); return',
            "  fi",
            '  case "$cmd" in',
            *cases,
            '    *) words="" ;;',
            "  esac",
            '  COMPREPLY=($(compgen -W "$words" -- "$cur"))',
            "}",
            "complete -o default -F _edgeprune edgeprune",
        ]
    )
    if shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    return script + "\n"


def cmd_completion(args: argparse.Namespace) -> int:
    from . import build_parser

    sys.stdout.write(completion_script(build_parser(), args.shell))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("completion", help='print a shell completion script: eval "$(edgeprune completion bash)"')
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete for")
    p.set_defaults(func=cmd_completion)
