"""``nemoforge`` command line: run, compile and inspect the recipe pipeline.

    nemoforge run smollm2-135m-demo                     # the whole recipe, locally (kfp.local)
    nemoforge run my.yaml --set distill.steps=10        # a recipe file, with overrides
    nemoforge compile smollm2-135m-demo -o pipeline.yaml
    nemoforge status --json
    nemoforge submit llama-3.1-8b --host https://kfp.example --experiment nemotron
    nemoforge schedule llama-3.1-8b --cron "0 0 3 * * 0" --host https://kfp.example
    nemoforge schedule --list --host https://kfp.example
"""

from __future__ import annotations

import os
import signal
import sys

from nemoforge.errors import NemoforgeError
from nemoforge_cli.cluster import cmd_schedule, cmd_submit
from nemoforge_cli.parser import build_parser
from nemoforge_cli.recipe import cmd_compile, cmd_show
from nemoforge_cli.run import cmd_run
from nemoforge_cli.serve import cmd_serve
from nemoforge_cli.status import cmd_status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.debug = getattr(args, "debug", False)
    commands = {
        "run": cmd_run,
        "compile": cmd_compile,
        "show": cmd_show,
        "submit": cmd_submit,
        "schedule": cmd_schedule,
        "status": cmd_status,
        "serve": cmd_serve,
    }
    try:
        code = commands[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader went away (`nemoforge status --json | head`): stop without a word, as Unix tools do on SIGPIPE;
        # stdout goes to /dev/null so that the interpreter's own flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except NemoforgeError as err:
        if args.debug:
            raise
        print(f"nemoforge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nemoforge: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
