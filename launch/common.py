"""Plumbing shared by the launchers: one-line input errors, KEY=VALUE parsing, printing and running commands.

Every launcher builds its work as a list of argv lists. `--dry-run` prints them one per line with `shlex.join`, so
each printed line can be pasted into a shell and runs exactly what the launcher would have run.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from typing import Callable, Iterable, Sequence

Command = list[str]

ENV_KEY = re.compile(r'[A-Za-z_][A-Za-z0-9_]*')
SAFE_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.-]*')


class LaunchError(ValueError):
  """A refused input (exit status 2) or a failed command (its exit status); printed as one line."""

  def __init__(self, field: str, message: str, exit_code: int = 2):
    super().__init__(f'{field}: {message}')
    self.field = field
    self.exit_code = exit_code


def require(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise LaunchError(field, message)


def check_match(value: str | None, pattern: re.Pattern | str, field: str, expected: str) -> str:
  """Returns `value` if it fully matches `pattern`, else raises naming the field and what was expected."""
  if value is None or value == '':
    raise LaunchError(field, f'missing; expected {expected}')
  if not re.fullmatch(pattern, value):
    raise LaunchError(field, f'{value!r} is invalid; expected {expected}')
  return value


def parse_env(items: Iterable[str] | None, field: str = '--env') -> list[tuple[str, str]]:
  """['A=1', 'B=x y'] -> [('A', '1'), ('B', 'x y')]; a key must be a shell variable name."""
  pairs = []
  for item in items or ():
    key, sep, value = item.partition('=')
    if not sep:
      raise LaunchError(field, f'{item!r} is not KEY=VALUE')
    check_match(key, ENV_KEY, field, 'KEY=VALUE with KEY a shell variable name ([A-Za-z_][A-Za-z0-9_]*)')
    if '\n' in value or '\0' in value:
      raise LaunchError(field, f'value of {key} contains a newline or NUL')
    pairs.append((key, value))
  return pairs


def export_lines(pairs: Sequence[tuple[str, str]]) -> list[str]:
  """Shell `export KEY=VALUE` statements with every value quoted."""
  return [f'export {key}={shlex.quote(value)}' for key, value in pairs]


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits at the first `--`: (the launcher's own options, the user's command passed through untouched)."""
  argv = list(argv)
  if '--' not in argv:
    return argv, []
  index = argv.index('--')
  return argv[:index], argv[index + 1:]


def format_command(argv: Sequence[str]) -> str:
  return shlex.join(argv)


def print_commands(commands: Sequence[Command], file=None) -> None:
  file = file or sys.stdout
  for argv in commands:
    print(format_command(argv), file=file)


def run_commands(commands: Sequence[Command]) -> None:
  """Runs each command in turn, output straight to the terminal; stops at the first failure."""
  for argv in commands:
    print(f'+ {format_command(argv)}', file=sys.stderr, flush=True)
    try:
      result = subprocess.run(argv, check=False)
    except FileNotFoundError:
      raise LaunchError(argv[0], 'not found on PATH (is it installed?)', exit_code=127) from None
    if result.returncode != 0:
      raise LaunchError('command', f'exit status {result.returncode}: {format_command(argv)}',
                        exit_code=result.returncode)


def run_main(prog: str, body: Callable[[], None]) -> int:
  """Calls `body`; a LaunchError becomes one line on stderr and the exit status."""
  try:
    body()
  except LaunchError as error:
    print(f'{prog}: error: {error}', file=sys.stderr)
    return error.exit_code
  return 0
