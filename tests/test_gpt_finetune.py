"""GPT-1 fine-tuning pieces (`gpt_jax.heads`): the input transformations, the similarity and multiple-choice
heads' symmetries, the task tokens appended to a pretrained vocabulary, and a generated learnable task trained
through the shared trainer with the auxiliary LM loss (λ = 0.5) to >= 95 % held-out accuracy."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import optim, sharding, trainer
from common.trainer import Objective
from gpt_jax import export, heads
from gpt_jax import model as gpt_model

VOCAB = 50
IDS = heads.task_token_ids(VOCAB)  # start 50, delimiter 51, extract 52


def config():
  return gpt_model.model_config(vocab_size=VOCAB + 3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=16, layout='gpt1',
                                hidden_dropout_prob=0.0, embedding_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_transformations():
  assert heads.transform([[1, 2, 3]], IDS, 8) == [50, 1, 2, 3, 52]
  assert heads.transform([[1, 2, 3, 4, 5], [6, 7]], IDS, 8) == [50, 1, 2, 3, 51, 6, 7, 52]  # longest shortened
  assert heads.example_sequences('similarity', [[1], [2]], IDS, 8) == [[50, 1, 51, 2, 52], [50, 2, 51, 1, 52]]
  assert heads.example_sequences('multiple_choice', [[1], [2], [3]], IDS, 8) == [[50, 1, 51, 2, 52],
                                                                               [50, 1, 51, 3, 52]]
  batch = heads.batch_of_examples('classification', [[[1, 2]], [[3]]], IDS, 6)
  np.testing.assert_array_equal(batch['extract_index'], [[3], [2]])
  assert batch['input_ids'][1, 0, 2] == 52 and batch['input_mask'].sum() == 7


def apply_head(kind, examples, num_labels=2):
  cfg = config()
  head = heads.GPTForTask(cfg, kind, num_labels)
  batch = heads.batch_of_examples(kind, examples, IDS, 12)
  variables = head.init(jax.random.PRNGKey(0), batch['input_ids'], batch['extract_index'])
  return head.apply(variables, batch['input_ids'], batch['extract_index'])


def test_similarity_ignores_order_and_choices_are_scored_one_by_one():
  a, b = [1, 2, 3], [4, 5]
  (ab, _), (ba, _) = apply_head('similarity', [[a, b]], 1), apply_head('similarity', [[b, a]], 1)
  np.testing.assert_array_equal(ab, ba)
  forward, _ = apply_head('multiple_choice', [[[9, 8], [1], [2, 3], [4]]])
  backward, _ = apply_head('multiple_choice', [[[9, 8], [4], [2, 3], [1]]])
  assert forward.shape == (1, 3)
  np.testing.assert_allclose(forward[0, ::-1], backward[0], atol=1e-6)


def test_task_tokens_extend_a_pretrained_vocabulary():
  cfg = config()
  cfg.vocab_size = VOCAB
  params = export.init_params(cfg, jax.random.PRNGKey(0))
  new_cfg, new_params = heads.add_task_tokens(cfg, params, jax.random.PRNGKey(1))
  assert new_cfg.vocab_size == VOCAB + 3 and cfg.vocab_size == VOCAB
  ids = np.arange(12)[None]
  old, new = export.lm_logits(cfg, params, ids), export.lm_logits(new_cfg, new_params, ids)
  np.testing.assert_array_equal(np.asarray(old), np.asarray(new)[..., :VOCAB])


def learnable_examples(rng, n):
  """Label 1 when the text's first token is in the upper half of the vocabulary: the extract state must look back."""
  texts = [rng.integers(0, VOCAB, size=rng.integers(3, 9)).tolist() for _ in range(n)]
  return [[t] for t in texts], np.asarray([int(t[0] >= VOCAB // 2) for t in texts], np.int32)


class Loader:
  """Step-indexed batches of the learnable task (the trainer's loader contract)."""

  def __init__(self, batch_size):
    self.global_batch_size = batch_size

  def host_batch(self, step):
    examples, labels = learnable_examples(np.random.default_rng([7, step]), self.global_batch_size)
    return dict(heads.batch_of_examples('classification', examples, IDS, 12), label=labels)

  def iterate(self, start_step):
    step = start_step
    while True:
      yield step, self.host_batch(step)
      step += 1


def classification_objective(cfg, lm_weight):
  head = heads.GPTForTask(cfg, 'classification', 2)

  def init_variables(rng):
    batch = heads.batch_of_examples('classification', [[[1]]], IDS, 12)
    return head.init({'params': rng}, batch['input_ids'], batch['extract_index'])

  def normalizers(batch):
    return {'task': jnp.asarray(batch['label'].shape[0], jnp.float32),
            'lm': jnp.maximum(jnp.sum(batch['input_mask'][..., 1:]).astype(jnp.float32), 1.0)}

  def loss_fn(params, batch, rng, aux, norms, train):
    logits, lm_logits = head.apply({'params': params}, batch['input_ids'], batch['extract_index'],
                                   deterministic=not train, rngs={'dropout': rng})
    sums = dict(task_loss=optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).sum(),
                correct=(jnp.argmax(logits, -1) == batch['label']).sum().astype(jnp.float32),
                **heads.auxiliary_lm_sums(lm_logits, batch))
    return sums['task_loss'] / norms['task'] + lm_weight * sums['lm_loss'] / norms['lm'], (sums, aux)

  def finalize(sums, norms):
    return dict(loss=sums['task_loss'] / norms['task'] + lm_weight * sums['lm_loss'] / norms['lm'],
                accuracy=sums['correct'] / norms['task'], lm_loss=sums['lm_loss'] / norms['lm'])

  return head, Objective(init_variables=init_variables, loss_fn=loss_fn, normalizers=normalizers,
                         finalize=finalize, flops_per_example=1.0, tokens_per_example=12)


def test_learnable_task_reaches_95_percent():
  cfg, lm_weight = config(), 0.5
  run_config = trainer.trainer_config(num_train_steps=150, global_batch_size=32, log_every=50, eval_every=0,
                                      num_eval_batches=0, checkpoint_every=0, progress_bar=False)
  run_config.optim = optim.optim_config(learning_rate=3e-3, warmup_steps=10, weight_decay=0.01)
  head, objective = classification_objective(cfg, lm_weight)
  mesh = sharding.make_mesh(run_config.mesh, devices=jax.devices()[:1])
  state, history = trainer.train(run_config, objective, Loader(32), mesh=mesh)
  examples, labels = learnable_examples(np.random.default_rng(123), 400)
  batch = heads.batch_of_examples('classification', examples, IDS, 12)
  logits, _ = head.apply({'params': jax.device_get(state.params)}, batch['input_ids'], batch['extract_index'])
  accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
  assert accuracy >= 0.95, (accuracy, history[-1])
  assert history[-1]['lm_loss'] < np.log(VOCAB + 3) - 0.2  # the auxiliary LM term learnt the input layout
