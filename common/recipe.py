"""The plug-in surface: a model is ONE `Recipe`, and the shared runners (`common.pretrain`, `common.finetune`,
`common.extract`) do everything else.

A model package `<name>_jax` exposes `RECIPE` in `<name>_jax/recipe.py`; its entry points (`python -m
<name>_jax.pretrain`, `.finetune`, `.extract_features`, `.export`) are thin calls into the runners with that recipe.
Code that only knows a model's name (the objective comparison, benchmarks, the launchers) asks `recipe.get(name)`,
which imports `<name>_jax.recipe` by name, as big_vision picks `config.model_name`: nothing in `common/` imports a
model package statically, and no model module imports a runner.

What a recipe provides, and who calls it:

* pretraining (`common.pretrain`):
  - `validate(config)`: every model-specific check that needs no data (model section, data section, their cross
    constraints, `config.dtype`); the runner has already checked the trainer and optimizer sections. Raises
    `common.config.ConfigError` naming the field.
  - `finalize_config(config)`: fills fields that follow others (XLNet: `model.reuse_len` from the data section).
  - `prepare_data(data_cfg, data_dir) -> (tokenizer, train_dir, eval_dir)`: the linear pipeline corpus -> tokenizer
    -> shards (`common.data.prepare`), with the model's pure "document -> rows" functions; reused when unchanged.
  - `make_loader(shard_dir, config, tokenizer, *, train, seed, process_index, process_count)`: a
    `common.data.pipeline.StepLoader` whose batch function is the model's pure "rows -> batch".
  - `make_objective(config) -> common.trainer.Objective` (loss, normalizers, FLOPs, shard spec of its aux state).
  - `batch_template(config)`: a host batch of the right shapes (dry runs compile from it; nothing is read).
* checkpoints in other formats:
  - `architecture_fields`: the model-config fields that define the network (taken from an `init_from` directory);
  - `tokenizer_file`, `tokenizer_field`: the tokenizer file an HF directory holds and the data field it fills;
  - `load_hf_dir(path) -> (model_cfg, params)`; `read_architecture(path) -> dict` (config.json fields, no weights);
  - `export_workdir(workdir, out_dir)`: the latest checkpoint as an HF directory.
* `learning_report(config, params, eval_loader, tokenizer, num_examples=)` -> lines printed at the end of a run
  with `config.report_examples > 0`: accuracy against the best constant predictor on the eval rows and a few
  fill-in-the-blank examples (`common/report.py`), so a newcomer sees what was learned.
* fine-tuning and features: `finetune` (a `common.model_adapter.ModelAdapter`: task heads per task kind, feature
  converters, encoder path) and `load_encoder(init)` (a `common.model_adapter.Encoder`), None where a model does
  not offer them; by convention both live in `<name>_jax/tasks.py`.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
from typing import Any, Callable

import ml_collections

Config = ml_collections.ConfigDict


def _no_change(config: Config) -> None:
  del config


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Everything the shared runners need from one model (see the module docstring)."""
  name: str
  validate: Callable[[Config], None]
  prepare_data: Callable[[Config, str], tuple[Any, str, str]]
  make_loader: Callable[..., Any]
  make_objective: Callable[[Config], Any]
  batch_template: Callable[[Config], dict]
  architecture_fields: tuple[str, ...] = ()
  tokenizer_file: str = ''
  tokenizer_field: str = ''
  load_hf_dir: Callable[[str], tuple] | None = None
  read_architecture: Callable[[str], dict] | None = None
  export_workdir: Callable[[str, str], None] | None = None
  finalize_config: Callable[[Config], None] = _no_change
  finetune: Any = None
  load_encoder: Callable[[str], Any] | None = None
  learning_report: Callable[..., list[str]] | None = None


def model_to_validate(model_cfg: Config, field: str = 'vocab_size') -> Config:
  """A copy of `model_cfg` to validate before the tokenizer exists: `<field> == 0` ("the tokenizer's") becomes 1."""
  model_cfg = copy.deepcopy(model_cfg)
  if model_cfg[field] == 0:
    model_cfg[field] = 1
  return model_cfg


def module_name(name: str) -> str:
  return f'{name}_jax.recipe'


def get(name: str) -> Recipe:
  """The recipe of model `name` ('bert', 'xlnet', 'gpt', 'elmo'), imported by name."""
  try:
    module = importlib.import_module(module_name(name))
  except ModuleNotFoundError as e:
    if e.name not in (module_name(name), f'{name}_jax'):
      raise
    from common.config import UserError  # pylint: disable=import-outside-toplevel
    raise UserError(f'unknown model {name!r}: no module {module_name(name)}') from e
  return module.RECIPE
