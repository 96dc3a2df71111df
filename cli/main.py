"""`ddk-cache`: the command line, assembled. Each command is its own module in `commands/`; this file only names them.

Thin by contract (pyproject's import contracts): a command parses its flags, calls one stage, prints the result.
Shared flags are `options.py`, the error boundary `boundary.py`, the consoles and `--json` `output.py`.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from ddk_cache.cli.commands import (
    attach_tokenizer,
    distill,
    eval_responses,
    evaluate,
    fetch_demo_teacher,
    inspect,
    minillm,
    pack,
    plot,
    prune_student,
    quickstart,
    rollout,
    teacher_dump,
    verify,
)
from ddk_cache.cli.help_format import SectionedCommand
from ddk_cache.cli.output import error_console
from ddk_cache.errors import USER_ERROR_EXIT_CODE

# click's exceptions, wherever this typer takes click from (typer >= 0.26 vendors it as typer._click)
_click_errors = sys.modules[typer.BadParameter.__module__]
_NoArgsIsHelp = getattr(_click_errors, "NoArgsIsHelpError", ())


class OneLineUsageErrors(TyperGroup):
    """Usage errors (an unknown choice, a missing option, a value that is not a number) as one line and exit 2.

    Every other user error is one line (`user_errors`); click's usage errors would otherwise print a
    usage block and a framed message. The line names the option, the value and the accepted ones.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NoArgsIsHelp as exc:
            typer.echo(exc.ctx.get_help())
            sys.exit(0)
        except _click_errors.UsageError as exc:
            where = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            message = exc.format_message().replace("Value error, ", "")  # pydantic's prefix, where typer validates with it
            error_console.print(f"error: {message}{where}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(USER_ERROR_EXIT_CODE)
        except _click_errors.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineUsageErrors,
    name="ddk-cache",
    help="Offline teacher logit caches (Zarr v3) for domain-guided distillation of LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain click help in sections (help_format.py): whole option names at 80 columns
)


@app.callback()
def options(debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of every error (also DDK_CACHE_DEBUG=1).")] = False) -> None:
    if debug:
        os.environ["DDK_CACHE_DEBUG"] = "1"


# Stage one, then stage two, then the tools around them: the order `ddk-cache --help` lists them in.
COMMANDS = {
    "teacher-dump": teacher_dump.teacher_dump,
    "pack": pack.pack,
    "inspect": inspect.inspect,
    "verify": verify.verify,
    "attach-tokenizer": attach_tokenizer.attach_tokenizer,
    "distill": distill.distill,
    "eval": evaluate.evaluate,
    "plot": plot.plot,
    "prune-student": prune_student.prune_student,
    "rollout": rollout.rollout,
    "minillm": minillm.minillm,
    "eval-responses": eval_responses.eval_responses,
    "fetch-demo-teacher": fetch_demo_teacher.fetch_demo_teacher,
    "quickstart": quickstart.quickstart,
}
for name, command in COMMANDS.items():
    app.command(name, cls=SectionedCommand)(command)


def main() -> None:
    app(prog_name="ddk-cache")


if __name__ == "__main__":
    sys.exit(main())
