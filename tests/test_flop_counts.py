"""Each objective's `flops_per_example` (what the trainer logs MFU with) counts what the compiled step executes.

The real train step (`trainer.build_setup` + `trainer.compile_train_step`: forward, backward, AdamW, clipping, the
non-finite guard) is compiled ahead of time on one device for BERT (with and without NSP), XLNet (with and without
memory, bi_data on and off, different shapes and `num_predict`), GPT (GPT-1 and GPT-2 layouts, two shapes) and ELMo
(full and sampled softmax), and `global_batch_size * flops_per_example` is compared with XLA's
`compiled.cost_analysis()['flops']` of that executable:

* within 10 % of XLA's total. Our count is matmuls only; XLA's total also has the elementwise work (softmax, masks,
  LayerNorm, GELU, dropout, the loss, AdamW). The dims are chosen so that matmuls dominate (d_model / hidden 256,
  FFN 1024; ELMo's LSTM 512 cells projected to 128) and that part stays at 5-7 %; the count must also never exceed
  XLA's total.
* within 1 % of the matmul FLOPs of the compiled HLO (2 * output size * contracted size summed over every `dot`,
  plus the char-CNN's `convolution`s and their gradients, window positions inside the unpadded input only): this
  pins the matmul count itself (it agrees exactly at the dims here), e.g. that XLA really drops the last XLNet
  layer's content stream and computes the memory rows' input gradient of the k/v projections.

ELMo's LSTMs are `lax.scan`s, one HLO `while` loop per layer and direction (and their backward), whose body XLA's
cost analysis counts ONCE, not once per time step. The scanned step is compiled as training runs it (no unrolling),
and the HLO matmul count multiplies every `while` body by its `known_trip_count` (from the HLO's backend config;
a loop without one fails the test). XLA's total gets the same correction for its matmuls
(`+ trip-scaled dots - dots counted once`); the loop bodies' elementwise work (the gates) stays counted once there,
so for ELMo the 10 % bound is the looser of the two checks and the 1 % one pins the count.

Only compilation, no step is run: about 5-10 s per case on an idle 2-core machine. ELMo's and GPT's cases took
15-31 s each, BERT's and XLNet's 31-77 s, in one run of the file under a load average of about 10.
"""
import math
import re

import jax
import ml_collections
import numpy as np
import pytest

from bert_jax import model as bert_model
from bert_jax import objective as bert_objective
from common import optim, sharding, trainer
from elmo_jax import model as elmo_model
from elmo_jax import objective as elmo_objective
from elmo_jax import pretrain_data as elmo_data
from gpt_jax import model as gpt_model
from gpt_jax import objective as gpt_objective
from xlnet_jax import model as xlnet_model
from xlnet_jax import objective as xlnet_objective

_DEF = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]')
_DOT = re.compile(r'=\s*\w+\[([\d,]*)\]\S*\s+dot\(%?([\w.\-]+)')
_COMPUTATION = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_CONV = re.compile(r'=\s*\w+\[([\d,]*)\]\S*\s+convolution\(%?([\w.\-]+),\s*%?([\w.\-]+)\)')


def _dims(text: str) -> list[int]:
  return [int(x) for x in text.split(',') if x]


def _conv_flops(line: str, shapes: dict, out_dims: list[int], lhs_name: str, rhs_name: str) -> float:
  """2 * multiply-adds of a 1-D `convolution` (as the char-CNN's and its gradients), counting only the window
  positions that fall inside the unpadded input, as XLA's cost analysis does."""
  labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', line)
  window = re.search(r'window=\{size=(\d+)(?: pad=(\d+)_\d+)?\}', line)
  assert labels and window and 'feature_group_count' not in line and 'stride' not in line, f'unexpected: {line}'
  lhs_labels, rhs_labels, out_labels = labels.groups()
  assert len(lhs_labels) == 3, f'only 1-D convolutions are counted: {line}'
  lhs, rhs = shapes[lhs_name], shapes[rhs_name]
  size, pad = int(window.group(1)), int(window.group(2) or 0)
  in_len, out_len = lhs[lhs_labels.index('0')], out_dims[out_labels.index('0')]
  pairs = sum(1 for o in range(out_len) for k in range(size) if 0 <= o + k - pad < in_len)
  return 2.0 * out_dims[out_labels.index('b')] * out_dims[out_labels.index('f')] * rhs[rhs_labels.index('i')] * pairs


def _instruction_flops(line: str, shapes: dict) -> float:
  conv = _CONV.search(line)
  if conv:
    return _conv_flops(line, shapes, _dims(conv.group(1)), conv.group(2), conv.group(3))
  m = _DOT.search(line)
  if not m:
    return 0.0
  contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', line)
  k = math.prod(shapes[m.group(2)][i] for i in _dims(contracting.group(1))) if contracting else 1
  return 2.0 * math.prod(_dims(m.group(1))) * k


def hlo_dot_flops(hlo_text: str, loop_trips: bool = True) -> float:
  """2 * (output elements) * (contracted size) summed over the `dot`s of an optimized HLO module, plus the
  multiply-adds of its (1-D) `convolution`s, every computation counted as often as the step runs it: a `while`
  body (a `lax.scan`) times its `known_trip_count` (once with `loop_trips=False`, as XLA's cost analysis counts
  it), fusions and other called computations once per call."""
  shapes, own, calls, entry, comp = {}, {}, {}, None, None
  lines = hlo_text.splitlines()
  for line in lines:
    m = _DEF.match(line)
    if m:
      shapes[m.group(1)] = _dims(m.group(2))
  for line in lines:
    header = _COMPUTATION.match(line)
    if header:
      comp = header.group(2)
      own[comp], calls[comp] = 0.0, []
      entry = comp if header.group(1) else entry
      continue
    if comp is None:
      continue
    own[comp] += _instruction_flops(line, shapes)
    body = re.search(r'body=%?([\w.\-]+)', line)
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if ' while(' in line:
      assert body and trips, f'a while loop without a known trip count: {line[:200]}'
      calls[comp].append((body.group(1), int(trips.group(1)) if loop_trips else 1))
    for name in re.findall(r'(?:calls|to_apply)=%?([\w.\-]+)', line):
      calls[comp].append((name, 1))

  def flops(name: str) -> float:
    return own[name] + sum(times * flops(callee) for callee, times in calls[name])
  return flops(entry)


def compile_step(config, objective, batch):
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  setup = trainer.build_setup(config, objective, mesh)
  _, jitted = trainer.compile_train_step(setup, objective, config)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  return trainer.lower_train_step(jitted, setup, spec).compile()


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per device program.
    cost = cost[0]
  return float(cost['flops'])


def bert_case(hidden, layers, seq, predictions, next_sentence, batch=8):
  config = trainer.trainer_config(num_train_steps=10, global_batch_size=batch, log_every=1, eval_every=0,
                                  num_eval_batches=0, checkpoint_every=0, progress_bar=False)
  config.model = bert_model.model_config(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                                         max_position_embeddings=seq)
  config.data = ml_collections.ConfigDict(dict(max_seq_length=seq, max_predictions_per_seq=predictions,
                                                next_sentence=next_sentence))
  config.optim = optim.optim_config(learning_rate=1e-3, warmup_steps=2, weight_decay=0.01)
  config.dtype, config.remat = 'float32', False
  objective = bert_objective.make_objective(config)
  return config, objective, bert_objective.dummy_batch(batch, seq, predictions)


def xlnet_case(d_model, layers, seq, num_predict, mem_len, bi_data, batch=8):
  config = trainer.trainer_config(num_train_steps=10, global_batch_size=batch, log_every=1, num_eval_batches=0,
                                  checkpoint_every=0, progress_bar=False)
  reuse = seq // 2
  config.model = xlnet_model.model_config(vocab_size=1000, d_model=d_model, n_layer=layers, n_head=d_model // 64,
                                          d_head=64, d_inner=4 * d_model, mem_len=mem_len, reuse_len=reuse,
                                          bi_data=bi_data)
  config.data = ml_collections.ConfigDict(dict(seq_len=seq, reuse_len=reuse, num_predict=num_predict,
                                                perm_size=seq // 4, bi_data=bi_data))
  config.optim = optim.optim_config(learning_rate=1e-3, warmup_steps=1)
  config.dtype, config.remat = 'float32', False
  objective = xlnet_objective.make_objective(config)
  ids = np.zeros((batch, seq), np.int32)
  batch_arrays = dict(input_ids=ids, segment_ids=ids, input_mask=np.ones_like(ids),
                      is_target=np.zeros((batch, seq), bool), is_special=np.zeros((batch, seq), bool))
  return config, objective, batch_arrays


def gpt_case(hidden, layers, seq, layout, batch=8):
  config = trainer.trainer_config(num_train_steps=10, global_batch_size=batch, log_every=1, num_eval_batches=0,
                                  checkpoint_every=0, progress_bar=False)
  config.model = gpt_model.model_config(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                                        num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                                        max_position_embeddings=seq, layout=layout)
  config.data = ml_collections.ConfigDict(dict(max_seq_length=seq))
  config.optim = optim.optim_config(learning_rate=1e-3, warmup_steps=1, weight_decay=0.01)
  config.dtype, config.remat = 'float32', False
  objective = gpt_objective.make_objective(config)
  return config, objective, gpt_objective.batch_template(config, batch)


def elmo_case(projection, lstm, layers, seq, softmax, batch=8):
  config = trainer.trainer_config(num_train_steps=10, global_batch_size=batch, log_every=1, num_eval_batches=0,
                                  checkpoint_every=0, progress_bar=False)
  config.model = elmo_model.model_config(vocab_size=1000, max_characters_per_token=10, char_embedding_dim=16,
                                         filters=[[1, 32], [2, 32], [3, 64]], projection_dim=projection,
                                         lstm_dim=lstm, n_lstm_layers=layers)
  config.data = elmo_data.data_config(max_seq_length=seq, softmax=softmax, num_sampled=64)
  config.optim = optim.optim_config(learning_rate=1e-3, warmup_steps=1)
  config.dtype = 'float32'
  objective = elmo_objective.make_objective(config)
  return config, objective, elmo_data.batch_template(seq, config.model.max_characters_per_token, batch)


CASES = {
    'bert-nsp-L2-seq64': lambda: bert_case(256, 2, 64, 10, next_sentence=True),
    'bert-no-nsp-L1-seq32': lambda: bert_case(256, 1, 32, 5, next_sentence=False),
    'xlnet-mem32-L2-seq64-predict10': lambda: xlnet_case(256, 2, 64, 10, mem_len=32, bi_data=False),
    'xlnet-nomem-bi-L2-seq32-predict4': lambda: xlnet_case(256, 2, 32, 4, mem_len=0, bi_data=True),
    'xlnet-mem32-bi-L1-seq64-predict16': lambda: xlnet_case(256, 1, 64, 16, mem_len=32, bi_data=True),
    'xlnet-nomem-L2-seq32-predict8': lambda: xlnet_case(256, 2, 32, 8, mem_len=0, bi_data=False),
    'gpt1-L2-seq64': lambda: gpt_case(256, 2, 64, 'gpt1'),
    'gpt2-L1-seq32': lambda: gpt_case(256, 1, 32, 'gpt2'),
    'gpt2-L2-seq64': lambda: gpt_case(256, 2, 64, 'gpt2'),
    'elmo-full-L2-seq8': lambda: elmo_case(128, 512, 2, 8, 'full'),
    'elmo-sampled-L1-seq8': lambda: elmo_case(128, 512, 1, 8, 'sampled'),
}


@pytest.mark.parametrize('case', list(CASES))
def test_flops_per_example_matches_compiled_step(case):
  config, objective, batch = CASES[case]()
  compiled = compile_step(config, objective, batch)
  ours = config.global_batch_size * objective.flops_per_example
  hlo = compiled.as_text()
  dots = hlo_dot_flops(hlo)
  total = xla_flops(compiled) + dots - hlo_dot_flops(hlo, loop_trips=False)  # + the loops' further matmul trips
  assert 0.9 * total <= ours <= total, f'{case}: ours {ours:.4e}, XLA cost_analysis {total:.4e} ({ours / total:.3f})'
  assert dots > 0, 'no dot found in the compiled HLO'
  if case.startswith('elmo'):  # the LSTM loops are counted per time step, not once
    assert dots > hlo_dot_flops(hlo, loop_trips=False), f'{case}: no matmul inside a while loop'
  assert ours == pytest.approx(dots, rel=0.01), f'{case}: ours {ours:.4e}, HLO matmuls {dots:.4e} ({ours / dots:.4f})'
