"""Four pretraining objectives (and the ablations the papers discuss), one corpus, one compute budget, the same
downstream tasks: the source document's comparison, measured.

  python -m benchmarks.compare_objectives --preset cpu --out runs/compare \
      --corpus embedded,../shared/data/wikitext-2/valid.txt,../shared/data/ptb/ptb.valid.txt \
      --eval_corpus embedded,../shared/data/ptb/ptb.test.txt --glue_dir ../shared/data/glue_data

Each objective (`benchmarks/compare/objectives.py`) is pretrained by its model's recipe on the shared trainer for
the preset's budget of training FLOPs (its own `flops_per_example`, the counter the trainer's MFU uses, times the
batch, so a cheaper objective takes more steps), with the same size, batch, optimizer, data seed and corpus; then
each task is fine-tuned from it with every seed (ELMo: the feature-based task model on the frozen biLM; `random_init`:
the BERT architecture from random weights, the baseline that says whether pretraining helped at all). Outputs in
`--out`: results.md, results.json, loss_vs_flops.png, downstream.png, and one directory per cell. A rerun with the
same arguments reuses finished cells and resumes unfinished ones; `--set FIELD=VALUE` overrides a preset field
(e.g. `--set budget_flops=3e13 --set seeds=0,1,2`).
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import sys
from typing import Sequence

import ml_collections

from benchmarks.compare import cells, objectives, presets, results
from common.data import corpus as corpus_lib
from common.tasks import registry

GLUE_DIRS = {'cola': 'CoLA', 'mrpc': 'MRPC', 'rte': 'RTE', 'stsb': 'STS-B', 'sst2': 'SST-2', 'wnli': 'WNLI',
             'qnli': 'QNLI', 'qqp': 'QQP', 'mnli': 'MNLI'}


def resolve_corpus(corpus: str, eval_corpus: str, out_dir: str) -> tuple[str, str]:
  """The comma lists of text files the recipes read: `embedded` among the entries is built once in
  `out_dir/corpus` (its train split for `corpus`, its validation split for `eval_corpus` or when none is given)."""
  corpus_dir = os.path.join(out_dir, 'corpus')
  built = {'train': os.path.join(corpus_dir, 'train.txt'), 'valid': os.path.join(corpus_dir, 'valid.txt')}

  def expand(source: str, split: str) -> list[str]:
    parts = [p.strip() for p in source.split(',') if p.strip()]
    if 'embedded' in parts and not all(os.path.exists(p) for p in built.values()):
      corpus_lib.build_embedded_corpus(corpus_dir)
    for part in parts:
      if part != 'embedded' and not os.path.exists(part):
        raise FileNotFoundError(f'corpus file {part} does not exist')
    return [built[split] if p == 'embedded' else os.path.abspath(p) for p in parts]

  train = expand(corpus, 'train')
  if not eval_corpus and 'embedded' not in corpus.split(','):
    raise ValueError('--eval_corpus is required when --corpus does not include the embedded corpus')
  evaluation = expand(eval_corpus or 'embedded', 'valid')
  return ','.join(train), ','.join(evaluation)


# Comparison tasks that are not registry names: SQuAD v1.1 dev split into two halves by article (the train split is
# not among the shipped files), trained on one half and scored on the other with the official metrics.
SQUAD_HALVES = 'squad_halves'
REGISTRY_TASKS = {SQUAD_HALVES: 'squad_v1.1'}


def registry_task(task: str) -> str:
  """The task registry's name of a comparison task (`learnable`, a GLUE name, `conll2003`, `squad_halves`)."""
  return registry.canonical_task(REGISTRY_TASKS.get(task, task))


def split_squad(squad_file: str, out_dir: str) -> str:
  """Writes `out_dir/train-v1.1.json` (the even-numbered articles of `squad_file`) and `dev-v1.1.json` (the odd
  ones): no context is in both halves. Returns `out_dir`."""
  try:
    with open(squad_file, encoding='utf-8') as f:
      data = json.load(f)
    articles = data['data']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'--squad_file {squad_file}: not a SQuAD JSON file ({type(e).__name__}: {e})') from None
  if len(articles) < 2:
    raise ValueError(f'--squad_file {squad_file}: {len(articles)} article(s); the halves need at least 2')
  os.makedirs(out_dir, exist_ok=True)
  for split, half in (('train', articles[0::2]), ('dev', articles[1::2])):
    path = os.path.join(out_dir, f'{split}-v1.1.json')
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump({'version': data.get('version', '1.1'), 'data': half}, f)
    os.replace(tmp, path)
  return out_dir


def task_data_dir(task: str, out_dir: str, glue_dir: str | None = None, conll_dir: str | None = None,
                  squad_file: str | None = None) -> str | None:
  """Where `task`'s files are: `learnable` is generated; GLUE tasks under `--glue_dir`; CoNLL-2003 `--conll_dir`;
  `squad_halves` written under `out_dir` from `--squad_file`."""
  if task == 'learnable':
    return None
  if task in GLUE_DIRS:
    if not glue_dir:
      raise ValueError(f'task {task} needs --glue_dir (the directory holding {GLUE_DIRS[task]}/)')
    path = os.path.join(glue_dir, GLUE_DIRS[task])
  elif task == 'conll2003':
    if not conll_dir:
      raise ValueError('task conll2003 needs --conll_dir')
    path = conll_dir
  elif task == SQUAD_HALVES:
    if not squad_file:
      raise ValueError(f'task {SQUAD_HALVES} needs --squad_file (SQuAD v1.1 dev-v1.1.json)')
    return split_squad(squad_file, os.path.join(out_dir, SQUAD_HALVES + '_data'))
  else:
    raise ValueError(f'task {task} is not part of the comparison (learnable, {", ".join(GLUE_DIRS)}, conll2003, '
                     f'{SQUAD_HALVES})')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'task {task}: {path} is not a directory')
  return path


def _random_init_source(specs: Sequence[objectives.ObjectiveSpec]) -> str | None:
  """The pretrained objective whose architecture and tokenizer the random-init baseline takes."""
  for spec in specs:
    if spec.pretrained and spec.model == 'bert':
      return spec.name
  return None


def run(preset: ml_collections.ConfigDict, out_dir: str, corpus: str, eval_corpus: str,
        glue_dir: str | None = None, conll_dir: str | None = None, header: Sequence[str] = (),
        squad_file: str | None = None) -> dict:
  """Runs (or resumes) every cell of `preset` into `out_dir` and writes the outputs; returns the table. Every
  argument is checked before any compute. A task a model does not offer (`objectives.offers`) is n/a in its row."""
  specs = [objectives.get(name) for name in preset.objectives]
  tasks = list(preset.tasks)
  kinds = {task: registry.task_info(registry_task(task)).kind for task in tasks}
  if any(not s.pretrained for s in specs) and _random_init_source(specs) is None:
    raise ValueError('objective random_init takes the BERT architecture and vocabulary of a pretrained BERT '
                     'objective: add one of bert_mlm_nsp, bert_mlm, bert_wwm')
  data_dirs = {task: task_data_dir(task, out_dir, glue_dir, conll_dir, squad_file) for task in tasks}
  os.makedirs(out_dir, exist_ok=True)
  corpus, eval_corpus = resolve_corpus(corpus, eval_corpus, out_dir)
  pretrained, downstream = {}, {}
  header = list(header) or default_header(preset)
  for spec in specs:  # Every pretraining first: the loss-vs-FLOPs comparison is complete before any task runs.
    if spec.pretrained:
      print(f'== pretraining {spec.name}', flush=True)
      pretrained[spec.name] = cells.pretrain_cell(spec, preset, os.path.join(out_dir, spec.name, 'pretrain'), corpus,
                                                  eval_corpus)
      results.write_all(out_dir, results.build_table(specs, tasks, pretrained, downstream), header)
  for spec in specs:
    init_dir = os.path.join(out_dir, spec.name if spec.pretrained else _random_init_source(specs), 'pretrain')
    for task in tasks:
      if not objectives.offers(spec, kinds[task]):
        downstream.setdefault(spec.name, {})[task] = results.NOT_OFFERED
        continue
      print(f'== {spec.name} / {task}', flush=True)
      downstream.setdefault(spec.name, {})[task] = cells.finetune_cell(
          spec, registry_task(task), preset, os.path.join(out_dir, spec.name, task), init_dir, data_dirs[task])
      results.write_all(out_dir, results.build_table(specs, tasks, pretrained, downstream), header)
  table = results.build_table(specs, tasks, pretrained, downstream)
  results.write_all(out_dir, table, header)
  return table


def default_header(preset: ml_collections.ConfigDict) -> list[str]:
  return ['# Pretraining objectives compared at one compute budget', '',
          f'Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()} with '
          f'{os.cpu_count()} CPUs. Budget {preset.budget_flops:.2e} training FLOPs per objective; '
          f'{len(preset.seeds)} fine-tuning seeds per task (mean ± std).']


def apply_overrides(preset: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """`FIELD=VALUE` (dotted fields; VALUE a Python literal, a comma list becomes a tuple, else a string)."""
  for item in overrides:
    if '=' not in item:
      raise ValueError(f'--set {item!r}: expected FIELD=VALUE')
    field, text = item.split('=', 1)
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = tuple(text.split(',')) if ',' in text else text
    if isinstance(value, list):
      value = tuple(value)
    *path, name = field.split('.')
    target = preset
    for part in path:
      target = target.get(part) if isinstance(target, ml_collections.ConfigDict) else None
    if not isinstance(target, ml_collections.ConfigDict) or name not in target:
      raise ValueError(f'--set {field}: no such preset field')
    target[name] = value


def use_compilation_cache(path: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_compilation_cache_dir', os.path.abspath(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='cpu', choices=sorted(presets.PRESETS))
  parser.add_argument('--out', required=True, help='output directory (cells, results.md/json, plots)')
  parser.add_argument('--corpus', default='embedded', help="'embedded' and/or comma-separated text files")
  parser.add_argument('--eval_corpus', default='', help="held-out text (default: the embedded validation split)")
  parser.add_argument('--glue_dir', default=None, help='directory with the GLUE task folders (CoLA/, MRPC/, ...)')
  parser.add_argument('--conll_dir', default=None, help='CoNLL-2003 directory')
  parser.add_argument('--squad_file', default=None,
                      help=f'SQuAD v1.1 JSON (dev-v1.1.json) for the {SQUAD_HALVES} task: trained on its even '
                           'articles, scored on its odd ones')
  parser.add_argument('--compilation_cache', default='',
                      help="JAX's persistent compilation cache (default OUT/jax_cache; 'none' to disable): the "
                           'fine-tuning steps of objectives with one architecture, and of every seed, compile once')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE', help='override a preset field')
  args = parser.parse_args(argv)
  preset = presets.get(args.preset)
  if args.compilation_cache != 'none':
    use_compilation_cache(args.compilation_cache or os.path.join(args.out, 'jax_cache'))
  try:
    apply_overrides(preset, args.set)
    command = ' '.join(['python -m benchmarks.compare_objectives'] + list(argv if argv is not None else sys.argv[1:]))
    header = default_header(preset) + ['', f'Command: `{command}`']
    table = run(preset, args.out, args.corpus, args.eval_corpus, args.glue_dir, args.conll_dir, header,
                args.squad_file)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    sys.exit(f'compare_objectives: {e}')
  print(results.markdown(table, ['# ' + args.out]), flush=True)


if __name__ == '__main__':
  main()
