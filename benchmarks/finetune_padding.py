"""Fine-tuning padding: what per-batch length buckets (and `group_by_length`) save on a real GLUE task.

  python -m benchmarks.finetune_padding --task glue/cola --data_dir GLUE/CoLA [--max_seq_length 64]
      [--steps 40 --hidden 256 --layers 4]   # also time that many training steps of a random BERT per setting

A WordPiece vocabulary (8000 pieces) is trained on the task's training text, so no pretrained model is needed. For
each setting (every row at max_seq_length; 4 buckets; 4 buckets with group_by_length=50) it prints the padding
fraction of the positions computed over one epoch at batch 32 and the batch lengths used; with `--steps`, it also
fine-tunes a random BERT of the given size for that many steps (one seed, dropout off) and prints the steady
tokens/s the trainer counts (padded), the real (non-padding) tokens/s, the step's compiled programs and wall time.
"""
from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time

import jax
import numpy as np

from bert_jax import model as bert_model
from bert_jax import tasks as bert_tasks
from bert_jax import tokenizer as bert_tokenizer
from common import finetune, tasks, trainer

SETTINGS = {'full padding': dict(length_buckets=1, group_by_length=0),
            '4 buckets': dict(length_buckets=4, group_by_length=0),
            '4 buckets + group_by_length=50': dict(length_buckets=4, group_by_length=50)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--task', default='glue/cola')
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--max_seq_length', type=int, default=64)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--steps', type=int, default=0)
  parser.add_argument('--hidden', type=int, default=256)
  parser.add_argument('--layers', type=int, default=4)
  args = parser.parse_args()

  config = finetune.finetune_config(max_seq_length=args.max_seq_length, global_batch_size=args.batch, seeds=(0,))
  examples = finetune.load_examples(args.task, 'train', args.data_dir, config)
  with tempfile.TemporaryDirectory() as tmp:
    text = os.path.join(tmp, 'text.txt')
    with open(text, 'w', encoding='utf-8') as f:
      for e in examples:
        f.write(e.text_a + '\n' + (e.text_b + '\n' if e.text_b else '') + '\n')
    tokenizer = bert_tokenizer.load_tokenizer(bert_tokenizer.train_wordpiece([text], 8000, tmp))
  name = tasks.registry_name(args.task)
  features = finetune.batch_features('classification', bert_tasks.ADAPTER.convert(
      name, examples, tokenizer, args.max_seq_length))
  real = int(np.asarray(features['input_mask']).sum())
  print(f'{args.task}: {len(examples)} training examples, {real / len(examples):.1f} real tokens a row at '
        f'max_seq_length {args.max_seq_length}, batch {args.batch}')
  for label, setting in SETTINGS.items():
    buckets = finetune.bucket_lengths(args.max_seq_length, setting['length_buckets'])
    loader = finetune.make_loader(features, args.batch, seed=0, buckets=buckets, group=setting['group_by_length'])
    steps = range(loader.steps_per_epoch)
    computed = sum(loader.length(s) for s in steps) * args.batch
    tokens = sum(loader.real_tokens(s) for s in steps)
    lengths = collections.Counter(loader.length(s) for s in steps)
    print(f'  {label:32s} padding {100 * (1 - tokens / computed):5.1f} % of computed positions; '
          f'batch lengths {dict(sorted(lengths.items()))}')

  if not args.steps:
    return
  cfg = bert_model.model_config(vocab_size=tokenizer.vocab_size, hidden_size=args.hidden,
                                num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                                intermediate_size=4 * args.hidden, max_position_embeddings=max(128, args.max_seq_length))
  compiled = []
  original = trainer.compile_train_step

  def recording(*a, **k):
    run, jitted = original(*a, **k)
    compiled.append(jitted)
    return run, jitted
  trainer.compile_train_step = recording
  for label, setting in SETTINGS.items():
    run_config = finetune.finetune_config(
        max_seq_length=args.max_seq_length, global_batch_size=args.batch, seeds=(0,), dropout=0.0,
        epochs=args.steps * args.batch / len(examples), log_every=max(1, args.steps // 4),
        num_eval_examples=args.batch, **setting)
    start = time.perf_counter()
    result = finetune.run_task(run_config, bert_tasks.ADAPTER, args.task, tokenizer, cfg, None, None,
                               args.data_dir)
    wall = time.perf_counter() - start
    history = [h for h in result['runs'][0]['history'] if 'tokens_per_sec' in h][1:]  # after compilation
    speed = result['runs'][0]['throughput']
    print(f'  {label:32s} {np.median([h["steps_per_sec"] for h in history]):6.2f} steps/s, '
          f'counted tokens/s {np.median([h["tokens_per_sec"] for h in history]):8.0f}, '
          f'real tokens/s {speed["real_tokens_per_sec"]:8.0f}, compiled step programs '
          f'{compiled[-1]._cache_size()}, wall {wall:5.1f} s (device {jax.devices()[0].platform})')  # pylint: disable=protected-access


if __name__ == '__main__':
  main()
