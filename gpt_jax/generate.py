"""Sampling from a GPT: jitted decoding with a KV cache (greedy, temperature, top-k, top-p).

  python -m gpt_jax.generate --init runs/gpt_tiny --prompt "The model" --max_new_tokens 40 --top_p 0.9
  python -m gpt_jax.generate --init HF_DIR --prompt "Hello" --greedy

`--init` is a Hugging Face GPT / GPT-2 directory (`config.json`, weights, `vocab.json` + `merges.txt`) or a
pretraining workdir (its latest checkpoint and `vocab.json`).

`generate` runs the prompt through the model once (filling the cache), then one token per step inside one
`lax.fori_loop`, each step attending to the cache. `use_cache=False` recomputes the whole fixed-length buffer every
step instead (the reference the cached path must equal token for token). The next token is chosen by
`choose_next`: greedy takes the arg max; otherwise logits are divided by `temperature`, cut to the `top_k` largest
(0: no cut) and to the smallest set whose probability reaches `top_p` (1.0: no cut), and sampled with the key
`fold_in(rng, position)`. After a row emits `eos_id` it emits `eos_id` only.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.core import meta

from common import storage
from common.config import UserError
from gpt_jax import model as gpt_model


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen (see the module docstring)."""
  greedy: bool = False
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def validate(self) -> None:
    if self.temperature <= 0:
      raise UserError(f'temperature must be > 0, got {self.temperature}')
    if self.top_k < 0:
      raise UserError(f'top_k must be >= 0 (0: no cut), got {self.top_k}')
    if not 0.0 < self.top_p <= 1.0:
      raise UserError(f'top_p must be in (0, 1], got {self.top_p}')


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """`[batch, vocab]` logits / temperature with the tokens outside the top-k and the top-p set at -inf."""
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k and sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each one
    kept = before < sampling.top_p  # the first token is always kept
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def choose_next(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """`[batch, vocab]` logits -> `[batch]` int32 next tokens."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('cfg_items', 'max_new_tokens', 'sampling', 'eos_id', 'use_cache'))
def _generate(params, prompt, rng, *, cfg_items, max_new_tokens, sampling, eos_id, use_cache):
  cfg = ml_collections.ConfigDict(dict(cfg_items))
  model = gpt_model.GPTLMHeadModel(cfg)
  batch, prompt_len = prompt.shape
  total = prompt_len + max_new_tokens
  tokens = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt)
  done = jnp.zeros((batch,), bool)

  def emit(t, logits, tokens, done):
    """Writes the token chosen from `logits` (the model's prediction at position t - 1) at position t."""
    token = choose_next(logits, jax.random.fold_in(rng, t), sampling)
    if eos_id is not None:
      token = jnp.where(done, eos_id, token)
      done = done | (token == eos_id)
    return tokens.at[:, t].set(token), done

  if use_cache:
    cache = gpt_model.init_cache(cfg, batch, total)
    logits, cache = model.apply({'params': params}, prompt, cache=cache)
    tokens, done = emit(prompt_len, logits[:, -1], tokens, done)

    def step(t, carry):
      tokens, done, cache = carry
      logits, cache = model.apply({'params': params}, jax.lax.dynamic_slice_in_dim(tokens, t - 1, 1, 1), cache=cache)
      tokens, done = emit(t, logits[:, -1], tokens, done)
      return tokens, done, cache
    tokens, _, _ = jax.lax.fori_loop(prompt_len + 1, total, step, (tokens, done, cache))
  else:
    def step(t, carry):
      tokens, done = carry
      logits, _ = model.apply({'params': params}, tokens)
      return emit(t, jax.lax.dynamic_index_in_dim(logits, t - 1, 1, keepdims=False), tokens, done)
    tokens, _ = jax.lax.fori_loop(prompt_len, total, step, (tokens, done))
  return tokens


def generate(cfg: ml_collections.ConfigDict, params: Mapping[str, Any], prompt, *, max_new_tokens: int,
             sampling: Sampling = Sampling(), rng: jax.Array | None = None, eos_id: int | None = None,
             use_cache: bool = True) -> np.ndarray:
  """`prompt [batch, prompt_len]` int ids (rows of equal length) -> `[batch, prompt_len + max_new_tokens]` int32:
  the prompt followed by the generated tokens (eval mode, float32)."""
  sampling.validate()
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] == 0:
    raise UserError(f'the prompt must be [batch, length] with length >= 1, got shape {tuple(prompt.shape)}')
  if max_new_tokens < 1 or prompt.shape[1] + max_new_tokens > cfg.max_position_embeddings:
    raise UserError(f'prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) must be within the '
                    f'model\'s {cfg.max_position_embeddings} positions, with max_new_tokens >= 1')
  rng = jax.random.PRNGKey(0) if rng is None else rng
  cfg_items = tuple(sorted((k, v) for k, v in cfg.to_dict().items()))
  out = _generate(meta.unbox(params), prompt, rng, cfg_items=cfg_items, max_new_tokens=int(max_new_tokens),
                  sampling=sampling, eos_id=eos_id, use_cache=use_cache)
  return np.asarray(out)


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------

def load_for_generation(init: str) -> tuple[ml_collections.ConfigDict, Any, Any]:
  """(model config, params, tokenizer) from an HF directory or a pretraining workdir."""
  from gpt_jax import tokenizer as gpt_tokenizer  # pylint: disable=import-outside-toplevel
  if not storage.isdir(init):
    raise UserError(f'--init {init}: not a directory (an HF GPT directory or a pretraining workdir)')
  if storage.isfile(storage.join(init, 'config.json')) and storage.isdir(storage.join(init, 'checkpoints')):
    from common import checkpoint  # pylint: disable=import-outside-toplevel
    params, config = checkpoint.restore_params(init)
    cfg = gpt_model.model_config(**config.model.to_dict())
  else:
    from gpt_jax import export  # pylint: disable=import-outside-toplevel
    cfg, params = export.load_hf_dir(init)
  vocab = storage.join(init, gpt_tokenizer.VOCAB_NAME)
  if not storage.isfile(vocab):
    raise UserError(f'{init} has no {gpt_tokenizer.VOCAB_NAME}: cannot encode a prompt')
  return cfg, params, gpt_tokenizer.load_tokenizer(vocab)


def main(argv) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  values = flags.FLAGS
  cfg, params, tokenizer = load_for_generation(values.init)
  ids = tokenizer.encode(values.prompt) or [tokenizer.eot_id]
  sampling = Sampling(greedy=values.greedy, temperature=values.temperature, top_k=values.top_k, top_p=values.top_p)
  max_new = min(values.max_new_tokens, cfg.max_position_embeddings - len(ids))
  out = generate(cfg, params, np.asarray([ids]), max_new_tokens=max_new, sampling=sampling,
                 rng=jax.random.PRNGKey(values.seed), eos_id=tokenizer.eot_id)
  new = out[0, len(ids):].tolist()
  if tokenizer.eot_id in new:
    new = new[:new.index(tokenizer.eot_id)]
  print(values.prompt + tokenizer.decode(new), flush=True)


def define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('init', None, 'An HF GPT / GPT-2 directory or a GPT pretraining workdir.')
  flags.DEFINE_string('prompt', '', 'Text to continue ("" starts from <|endoftext|>).')
  flags.DEFINE_integer('max_new_tokens', 50, 'Tokens to generate (fewer if the model runs out of positions).')
  flags.DEFINE_bool('greedy', False, 'Take the most likely token at every step.')
  flags.DEFINE_float('temperature', 1.0, 'Divides the logits before sampling.')
  flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens (0: all).')
  flags.DEFINE_float('top_p', 1.0, 'Sample among the smallest set of tokens whose probability reaches p.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.mark_flags_as_required(['init'])


if __name__ == '__main__':
  from common import run as run_lib  # pylint: disable=ungrouped-imports
  define_flags()
  run_lib.app_run(main)
