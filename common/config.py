"""Config helpers shared by every model: validation that refuses a bad config before any compute.

Configs are `ml_collections.ConfigDict`s built by `get_config()` in a config file and overridden on the command
line with `--config.KEY=VALUE`. Every check raises `ConfigError` with a one-line message naming the field.
"""
from __future__ import annotations

from typing import Any, Iterable

import ml_collections


class UserError(ValueError):
  """A mistake in what the user gave (config, flag, path, input data, a busy workdir), not a bug: the entry points
  print the message as one line naming the culprit and exit 2; any other exception keeps its traceback."""


class ConfigError(UserError):
  """A config value is invalid; the message names the field and says what is wrong."""


def require(condition: bool, field: str, message: str) -> None:
  """Raises `ConfigError('config.<field>: <message>')` unless `condition` holds."""
  if not condition:
    raise ConfigError(f'config.{field}: {message}')


def get_path(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def require_positive(config: ml_collections.ConfigDict, fields: Iterable[str]) -> None:
  for field in fields:
    value = get_path(config, field)
    require(isinstance(value, (int, float)) and value > 0, field, f'must be a positive number, got {value!r}')


def require_fraction(config: ml_collections.ConfigDict, fields: Iterable[str], *, allow_one: bool = False) -> None:
  for field in fields:
    value = get_path(config, field)
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    require(isinstance(value, (int, float)) and 0.0 <= value and upper_ok, field,
            f'must be in [0, {"1]" if allow_one else "1)"}, got {value!r}')


def require_choice(config: ml_collections.ConfigDict, field: str, choices: Iterable[str]) -> None:
  choices = tuple(choices)
  value = get_path(config, field)
  require(value in choices, field, f'must be one of {choices}, got {value!r}')


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """A JSON-serialisable copy of the config, for logs and checkpoints."""
  return config.to_dict() if hasattr(config, 'to_dict') else dict(config)
