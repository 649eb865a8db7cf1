"""Draws what XLNet's permutation LM does to one sentence: a sampled factorisation order and the content-stream and
query-stream attention masks it induces (the two-stream figures of the XLNet paper); and, for a trained BERT, XLNet
or GPT, its attention maps on a sentence (`attention`).

  python -m xlnet_jax.visualize --sentence "New York is a city" --num_predict 3 --out runs/viz
  python -m xlnet_jax.visualize --sentence "..." --init runs/xlnet_tiny --targets 2,3 --seed 1 --out runs/viz
  python -m xlnet_jax.visualize attention --workdir runs/bert_tiny --text "Return the value." --out runs/viz

Tokens: the sentencepiece pieces of `--init` (a workdir or HF directory holding `spiece.model`), else the sentence's
whitespace words. Targets: `--targets` (0-based token positions), else `--num_predict` positions drawn with `--seed`.
The order and the masks come from the same sampler the training step uses (`xlnet_jax.permutation`), so the
picture is exactly what the model sees: in both masks row i is the query, column j the key, white = i may attend
to j. Writes `OUT/factorization.png` and `OUT/masks.npz` (`perm_mask`, `content_mask`, `query_mask`, `rank`,
`is_target`, `tokens`). Needs matplotlib (`pip install matplotlib`).

Attention maps (`attention`): `--workdir` is a pretraining workdir (its latest checkpoint; the model is the recipe
whose architecture fields its `config.json` holds, or `--model`) or an HF directory of the model. The sentence is laid
out as feature extraction lays it out (BERT `[CLS] text [SEP]`, XLNet `text <sep> <cls>` padded on the left), for GPT
as plain text, padded to `--max_seq_length`. The probabilities are the ones the model's own attention computes
(sown by `common.attention.attention_probs` into the `intermediates` collection; XLNet: the content stream, no
memory, no permutation). Writes `OUT/attention_layer_{i}.png` (one figure a layer, a grid of heads, query rows and
key columns labelled with the tokens; padding cropped) and `OUT/attention.npz` (`probs [layers, heads, L, L]` over
the padded length, `input_ids`, `input_mask`, `tokens` of the real positions, `positions`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import jax
import numpy as np

from common import storage
from common.config import UserError
from xlnet_jax import permutation


def tokenize(sentence: str, init: str | None) -> list[str]:
  if not sentence.strip():
    raise UserError('--sentence is empty')
  if not init:
    return sentence.split()
  from xlnet_jax import tokenizer as xlnet_tokenizer  # pylint: disable=import-outside-toplevel
  model_file = storage.join(init, xlnet_tokenizer.MODEL_FILE)
  if not storage.exists(model_file):
    raise UserError(f'{init}: no {xlnet_tokenizer.MODEL_FILE} there')
  tok = xlnet_tokenizer.load_tokenizer(model_file)
  return [tok.id_to_piece(i) for i in tok.encode_batch([sentence])[0]]


def choose_targets(num_tokens: int, targets: Sequence[int] | None, num_predict: int, seed: int) -> np.ndarray:
  """`[L] bool`: the given positions, or `num_predict` drawn without replacement."""
  is_target = np.zeros([num_tokens], bool)
  if targets:
    bad = [t for t in targets if not 0 <= t < num_tokens]
    if bad:
      raise UserError(f'--targets {bad} outside the {num_tokens} tokens (0-based)')
    is_target[list(targets)] = True
  else:
    if not 0 < num_predict <= num_tokens:
      raise UserError(f'--num_predict={num_predict} must be in [1, {num_tokens}] (the number of tokens)')
    is_target[np.random.default_rng(seed).choice(num_tokens, num_predict, replace=False)] = True
  return is_target


def sample_masks(is_target: np.ndarray, seed: int) -> dict[str, np.ndarray]:
  """The sampler's order and masks for one row (no specials, no reuse part); 1 = may NOT attend."""
  out = permutation.sample_permutation(jax.random.key(seed), is_target[None], np.zeros_like(is_target)[None],
                                       num_predict=int(is_target.sum()), perm_size=None)
  perm_mask = np.asarray(out['perm_mask'][0])
  return {'perm_mask': perm_mask, 'query_mask': perm_mask,
          'content_mask': np.asarray(permutation.content_stream_mask(out['perm_mask'])[0]),
          'rank': np.asarray(out['rank'][0]), 'is_target': np.asarray(out['is_target'][0])}


def _draw_mask(ax, mask: np.ndarray, tokens: Sequence[str], title: str) -> None:
  ax.imshow(1.0 - mask, cmap='gray', vmin=0, vmax=1)
  ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
  ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
  ax.set_xlabel('key (attended to)')
  ax.set_ylabel('query')
  ax.set_title(title, fontsize=9)


def draw(tokens: Sequence[str], masks: dict[str, np.ndarray], out_dir: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  order = [int(p) for p in np.argsort(masks['rank']) if masks['is_target'][p]]
  context = [f'{t} ({p})' for p, t in enumerate(tokens) if not masks['is_target'][p]]
  fig, axes = plt.subplots(1, 3, figsize=(15, 5), gridspec_kw={'width_ratios': [1.2, 1, 1]})
  ax = axes[0]
  lines = ['context (not predicted, all see each other):'] + ['   ' + ', '.join(context[i:i + 6])
                                                               for i in range(0, len(context), 6)]
  lines += ['', 'then the targets, in the sampled order:']
  lines += [f'   {place + 1}. {tokens[p]} ({p}) sees the context and targets 1..{place}' if place else
            f'   1. {tokens[p]} ({p}) sees the context only' for place, p in enumerate(order)]
  for k, line in enumerate(lines):
    ax.text(0.0, 1 - (k + 1) / (len(lines) + 1), line, fontsize=8, transform=ax.transAxes,
            color='tab:red' if line.startswith('   ') and '. ' in line[:8] else 'black')
  ax.axis('off')
  ax.set_title('factorisation order (token (position))', fontsize=9)
  _draw_mask(axes[1], masks['content_mask'], tokens, 'content stream h: sees itself')
  _draw_mask(axes[2], masks['query_mask'], tokens, 'query stream g: not itself (targets)')
  storage.makedirs(out_dir)
  path = storage.join(out_dir, 'factorization.png')
  with storage.open_file(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=110, bbox_inches='tight')
  plt.close(fig)
  return path


def visualize(sentence: str, out_dir: str, *, init: str | None = None, targets: Sequence[int] | None = None,
              num_predict: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
  tokens = tokenize(sentence, init)
  masks = sample_masks(choose_targets(len(tokens), targets, num_predict, seed), seed)
  draw(tokens, masks, out_dir)
  with storage.open_file(storage.join(out_dir, 'masks.npz'), 'wb') as f:
    np.savez(f, tokens=np.asarray(tokens), **masks)
  return masks


# ----------------------------------------------------------------------------------------------------------------------
# Attention maps of a trained model.
# ----------------------------------------------------------------------------------------------------------------------

ATTENTION_MODELS = ('bert', 'xlnet', 'gpt')
_HF_MODEL_TYPES = {'bert': 'bert', 'xlnet': 'xlnet', 'gpt2': 'gpt', 'openai-gpt': 'gpt'}


def detect_model(directory: str) -> str:
  """'bert', 'xlnet' or 'gpt': the recipe whose architecture fields a workdir's `config.json` model section holds
  all of, or an HF directory's `model_type`."""
  import json  # pylint: disable=import-outside-toplevel
  from common import recipe  # pylint: disable=import-outside-toplevel
  path = storage.join(directory, 'config.json')
  if not storage.exists(path):
    raise UserError(f'--workdir {directory}: no config.json there (not a pretraining workdir or HF directory)')
  with storage.open_file(path, 'r') as f:
    config = json.load(f)
  if 'model' not in config:
    name = _HF_MODEL_TYPES.get(config.get('model_type'))
    if name is None:
      raise UserError(f'{path}: model_type {config.get("model_type")!r} is none of {sorted(_HF_MODEL_TYPES)}')
    return name
  fields = set(config['model'])
  names = [n for n in ATTENTION_MODELS if set(recipe.get(n).architecture_fields) <= fields]
  if len(names) != 1:
    raise UserError(f'{path}: cannot tell the model from its fields (matches {names or "none"} of '
                    f'{list(ATTENTION_MODELS)}); pass --model')
  return names[0]


def _model(name: str, model_cfg):
  """`apply(params, input_ids, segment_ids, input_mask) -> intermediates` of model `name`'s flax encoder."""
  if name == 'bert':
    from bert_jax import model as bert_model  # pylint: disable=import-outside-toplevel
    module = bert_model.BertModel(model_cfg)
  elif name == 'xlnet':
    from xlnet_jax import model as xlnet_model  # pylint: disable=import-outside-toplevel
    module = xlnet_model.XLNetModel(model_cfg)
  elif name == 'gpt':
    from gpt_jax import model as gpt_model  # pylint: disable=import-outside-toplevel
    module = gpt_model.GPTModel(model_cfg)
    return lambda params, ids, segments, mask: module.apply(  # Causal: right padding never reaches a real token.
        {'params': params}, ids, deterministic=True, mutable=['intermediates'])[1]['intermediates']
  else:
    raise UserError(f'--model {name!r}: expected one of {list(ATTENTION_MODELS)}')
  return lambda params, ids, segments, mask: module.apply(
      {'params': params}, ids, segments, mask, deterministic=True, mutable=['intermediates'])[1]['intermediates']


def collect_probs(intermediates) -> np.ndarray:
  """The sown `attention_probs` of every layer, `[layers, batch, heads, q, k]`, in layer order (the trailing number
  of the layer's module name: `layer_0`, `h_1`, ...)."""
  import re  # pylint: disable=import-outside-toplevel
  found = []

  def walk(tree, path):
    for key, value in tree.items():
      if key == 'attention_probs':
        found.append((path, value[0]))
      elif hasattr(value, 'items'):
        walk(value, path + (key,))

  walk(intermediates, ())
  if not found:
    raise ValueError('the model sowed no attention_probs (its attention does not pass sow_probs)')

  def order(entry):
    return tuple(int(m.group(1)) if (m := re.search(r'(\d+)$', part)) else -1 for part in entry[0])

  return np.stack([np.asarray(value) for _, value in sorted(found, key=order)])


def attention_probs(name: str, model_cfg, params, input_ids, segment_ids=None, input_mask=None) -> np.ndarray:
  """`[layers, batch, heads, L, L]` float32 attention probabilities of model `name` ('bert', 'xlnet', 'gpt'; encoder
  params) on a batch, deterministic; input_mask 1 = real token (GPT: ignored, causal)."""
  input_ids = np.asarray(input_ids, np.int32)
  segment_ids = np.zeros_like(input_ids) if segment_ids is None else np.asarray(segment_ids, np.int32)
  input_mask = np.ones_like(input_ids) if input_mask is None else np.asarray(input_mask, np.int32)
  return collect_probs(jax.jit(_model(name, model_cfg))(params, input_ids, segment_ids, input_mask))


def _layout(name: str, tokenizer, text: str, max_seq_length: int) -> dict[str, np.ndarray]:
  """One row `input_ids`, `segment_ids`, `input_mask` `[1, L]` for `text` (module docstring)."""
  if name == 'gpt':
    ids = tokenizer.encode(text)[:max_seq_length]
    pad = max_seq_length - len(ids)
    mask = [1] * len(ids) + [0] * pad
    return {'input_ids': np.asarray([ids + [0] * pad], np.int32), 'input_mask': np.asarray([mask], np.int32),
            'segment_ids': np.zeros([1, max_seq_length], np.int32)}
  import importlib  # pylint: disable=import-outside-toplevel
  from common.tasks import PairExample  # pylint: disable=import-outside-toplevel
  convert = importlib.import_module(f'{name}_jax.finetune_data').convert_pair_examples
  example = PairExample(guid='0', text_a=text, text_b=None, label=None)
  features = convert([example], tokenizer, max_seq_length)
  return {k: np.asarray(features[k], np.int32) for k in ('input_ids', 'segment_ids', 'input_mask')}


def attention_maps(directory: str, text: str, *, model: str | None = None, max_seq_length: int = 64
                   ) -> dict[str, np.ndarray]:
  """The attention of the model in `directory` (workdir or HF directory) on `text`: `probs [layers, heads, L, L]`,
  the row's `input_ids`, `input_mask` `[L]`, `positions` (the real tokens' indices) and their `tokens`."""
  import importlib  # pylint: disable=import-outside-toplevel
  if not text.strip():
    raise UserError('--text is empty')
  if max_seq_length < 2:
    raise UserError(f'--max_seq_length={max_seq_length} must be at least 2')
  name = model or detect_model(directory)
  if name not in ATTENTION_MODELS:
    raise UserError(f'--model {name!r}: expected one of {list(ATTENTION_MODELS)}')
  model_cfg, params, tokenizer = importlib.import_module(f'{name}_jax.tasks').load_init(directory)
  row = _layout(name, tokenizer, text, max_seq_length)
  probs = attention_probs(name, model_cfg, params, row['input_ids'], row['segment_ids'], row['input_mask'])[:, 0]
  positions = np.flatnonzero(row['input_mask'][0])
  tokens = tokenizer.convert_ids_to_tokens(row['input_ids'][0, positions].tolist())
  return {'probs': probs, 'input_ids': row['input_ids'][0], 'input_mask': row['input_mask'][0],
          'positions': positions, 'tokens': np.asarray(tokens), 'model': np.asarray(name)}


def draw_attention(maps: dict[str, np.ndarray], out_dir: str, title: str = '') -> list[str]:
  """`out_dir/attention_layer_{i}.png` for every layer: its heads in a grid, real tokens only; returns the files."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  storage.makedirs(out_dir)
  keep, tokens = maps['positions'], [str(t) for t in maps['tokens']]
  num_layers, num_heads = maps['probs'].shape[:2]
  cols = min(4, num_heads)
  rows = -(-num_heads // cols)
  size = 1.2 + 0.22 * len(tokens)
  written = []
  for layer in range(num_layers):
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
    for head, ax in enumerate(axes.flat):
      if head >= num_heads:
        ax.axis('off')
        continue
      ax.imshow(maps['probs'][layer, head][np.ix_(keep, keep)], cmap='viridis', vmin=0.0, vmax=1.0)
      ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
      ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
      ax.set_title(f'head {head}', fontsize=9)
    fig.suptitle(f'{title} layer {layer}: row = query, column = key attended to'.strip(), fontsize=10)
    path = storage.join(out_dir, f'attention_layer_{layer}.png')
    with storage.open_file(path, 'wb') as f:
      fig.savefig(f, format='png', dpi=100, bbox_inches='tight')
    plt.close(fig)
    written.append(path)
  with storage.open_file(storage.join(out_dir, 'attention.npz'), 'wb') as f:
    np.savez(f, **maps)
  return written


def attention_main(argv: Sequence[str]) -> int:
  from common import run as run_lib  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog='python -m xlnet_jax.visualize attention',
                                   description='Attention maps of a trained BERT, XLNet or GPT on one sentence.')
  parser.add_argument('--workdir', required=True, help='a pretraining workdir or an HF directory of the model')
  parser.add_argument('--text', required=True)
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--model', default=None, choices=ATTENTION_MODELS, help='default: read from config.json')
  parser.add_argument('--max_seq_length', type=int, default=64)
  args = parser.parse_args(argv)

  def run(_):
    maps = attention_maps(args.workdir, args.text, model=args.model, max_seq_length=args.max_seq_length)
    return draw_attention(maps, args.out, title=str(maps['model']))

  for path in run_lib.guard(run)([]):
    print(path)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  from common import run as run_lib  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ['attention']:
    return attention_main(argv[1:])
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sentence', required=True)
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--init', default=None, help='a directory with spiece.model (else whitespace words)')
  parser.add_argument('--targets', default='', help='comma-separated 0-based target positions')
  parser.add_argument('--num_predict', type=int, default=2, help='targets drawn when --targets is not given')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  targets = [int(t) for t in args.targets.split(',') if t.strip()]
  run_lib.guard(lambda _: visualize(args.sentence, args.out, init=args.init, targets=targets,
                                    num_predict=args.num_predict, seed=args.seed))([])
  print(storage.join(args.out, 'factorization.png'))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
