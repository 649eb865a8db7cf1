"""Glue every pretraining entry point shares: data prepared once across hosts, the vocabulary size filled in,
absl logging kept quiet."""
from __future__ import annotations

import ast
import logging as std_logging
import os
import sys
from typing import Any, Callable, Sequence

import jax
import ml_collections
from absl import logging

from common.config import ConfigError, UserError


def prepare_on_primary(prepare: Callable[[], Any], name: str) -> Any:
  """Runs `prepare()` on process 0 first, then on every other process, which finds the result complete and reuses it.

  `prepare` must be idempotent (the data preparers skip stages whose fingerprint matches).
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    if jax.process_index() == 0:
      prepare()
    multihost_utils.sync_global_devices(f'{name}_prepared')
  return prepare()


def fill_vocab_size(model_cfg: ml_collections.ConfigDict, tokenizer_vocab_size: int, field: str = 'vocab_size') -> None:
  """`model.<field> == 0` follows the tokenizer; a set value must be at least the tokenizer's vocabulary."""
  if model_cfg[field] == 0:
    model_cfg[field] = tokenizer_vocab_size
  elif model_cfg[field] < tokenizer_vocab_size:
    raise ConfigError(f'config.model.{field}: {model_cfg[field]} is smaller than the tokenizer vocabulary '
                      f'({tokenizer_vocab_size}); set it to 0 to follow the tokenizer')


class _NoSpaceFilter(std_logging.Filter):
  """Drops the library log records (with their tracebacks, one per failed write) that a full disk causes: the entry
  point reports it as one line (`describe_failure`)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += str(record.exc_info[1])
    return 'No space left on device' not in text


def import_init(config: ml_collections.ConfigDict, load_hf_dir: Callable[..., tuple], architecture: Sequence[str],
                tokenizer_file: str, tokenizer_field: str) -> Any:
  """`config.init_from` (an HF directory) -> its params; its architecture fields replace config.model's (a set
  value that differs is reported), and its `tokenizer_file` becomes `config.data.<tokenizer_field>` unless set."""
  from common import storage  # pylint: disable=import-outside-toplevel
  hf_cfg, params, info = load_hf_dir(config.init_from, return_info=True)
  for field in architecture:
    if config.model[field] not in (0, hf_cfg[field]):
      logging.warning('model.%s=%s replaced by %s from %s', field, config.model[field], hf_cfg[field],
                      config.init_from)
    config.model[field] = hf_cfg[field]
  tokenizer = storage.join(config.init_from, tokenizer_file)
  if not config.data[tokenizer_field] and storage.exists(tokenizer):
    config.data[tokenizer_field] = tokenizer
  if info.get('initialised'):
    logging.warning('not in %s, freshly initialised: %s', config.init_from, info['initialised'])
  return params


def quiet_logging(flags_values) -> None:
  """Checkpointing libraries log every save at INFO: default to WARNING unless --verbosity was given."""
  if not flags_values['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _NoSpaceFilter) for f in handler.filters):
    handler.addFilter(_NoSpaceFilter())


# ----------------------------------------------------------------------------------------------------------------
# Entry points: user errors as one line, bugs with their traceback.
# ----------------------------------------------------------------------------------------------------------------

USAGE_EXIT = 2   # a user error: bad config, flag, path, busy workdir
RUN_EXIT = 1     # the run could not go on: disk full, too many non-finite steps
HELP_FLAGS = ('--help', '-h', '-?', '--helpshort', '--helpfull', '--helpxml')


def describe_failure(error: BaseException) -> tuple[int, str] | None:
  """(exit status, one-line message) for an error the user can act on; None for a bug (keep the traceback)."""
  from common import checkpoint  # pylint: disable=import-outside-toplevel
  full = checkpoint.no_space_error(error)
  if full is not None:
    where = getattr(full, 'filename', None)
    detail = full.strerror if full.strerror and full.strerror != 'No space left on device' else ''
    detail = detail.replace('No space left on device: ', '')
    return RUN_EXIT, (f'no space left on device{f" writing {where}" if where else ""}{f" ({detail})" if detail else ""}'
                      ': free space or use another workdir, then rerun (it resumes from the last complete checkpoint)')
  if isinstance(error, UserError):
    return USAGE_EXIT, str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  if isinstance(error, PermissionError):
    return USAGE_EXIT, f'permission denied: {error.filename or error}'
  if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
    return USAGE_EXIT, f'{error.strerror or error}: {error.filename}' if error.filename else str(error)
  if isinstance(error, FloatingPointError):
    return RUN_EXIT, str(error)
  return None


def guard(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """`main` with user errors printed as `error: ...` on one line (exit 2, or 1 for a run that cannot go on)."""
  def guarded(argv):
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      failure = describe_failure(e)
      if failure is None:
        raise
      code, message = failure
      print(f'error: {message}', file=sys.stderr, flush=True)
      if code == RUN_EXIT:  # background writers may still be failing: leave without the interpreter's teardown
        sys.stdout.flush()
        os._exit(code)  # pylint: disable=protected-access
      sys.exit(code)
  return guarded


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with `--help` exiting 0 and a bad flag or config override as one line, exit 2."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:
    if any(a in HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise e
  except Exception as e:  # pylint: disable=broad-except
    message = str(e).strip()
    if message[:1] in ('"', "'"):  # a config override's KeyError/AttributeError arrives as the repr of its text
      try:
        message = str(ast.literal_eval(message))
      except (ValueError, SyntaxError):
        pass
    message = ' '.join(message.split())
    print(f'error: bad flag: {message} (see --help)', file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT)


def app_run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` with `guard` and `parse_flags`: the one way every entry point starts."""
  from absl import app  # pylint: disable=import-outside-toplevel
  app.run(guard(main), flags_parser=parse_flags)
