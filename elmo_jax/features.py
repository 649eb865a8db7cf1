"""ELMo features of raw sentences: the frozen biLM's layers for every word, from the words' own characters.

The features of a sentence of n words are `[1 + n_lstm_layers, n, 2 P]`: layer 0 is the token encoder's vector
twice, layer k the k-th LSTM layer's forward and backward outputs side by side (`ElmoBiLM.features`). The sentence
runs as `<S> w_1 .. w_n </S>` and the boundary positions are dropped from what is returned, as the reference's
users do. No word vocabulary is involved: every word, known or not, is read through its characters.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import storage
from elmo_jax import model as elmo_model
from elmo_jax import pretrain_data, tokenizer, weights


@dataclasses.dataclass(frozen=True)
class BiLM:
  """A loaded biLM: model config, parameters, and the word vocabulary when the directory has one."""
  config: ml_collections.ConfigDict
  params: Any
  vocabulary: tokenizer.WordVocabulary | None = None

  @property
  def num_layers(self) -> int:
    return 1 + int(self.config.n_lstm_layers)

  @property
  def feature_dim(self) -> int:
    return 2 * int(self.config.projection_dim)


def load_bilm(path: str) -> BiLM:
  """A biLM directory (`options.json` + `weights.hdf5`, `elmo_jax.weights`) or a pretraining workdir (its newest
  checkpoint)."""
  if storage.exists(storage.join(path, weights.OPTIONS_FILE)):
    cfg, params = weights.read_weights(path)
  else:
    from common import checkpoint  # pylint: disable=import-outside-toplevel
    params, config = checkpoint.restore_params(path)
    cfg = config.model
  has_vocab = storage.exists(storage.join(path, tokenizer.VOCAB_FILE))
  return BiLM(cfg, params, tokenizer.load_vocabulary(path) if has_vocab else None)


def sentences_to_batch(sentences: Sequence[Sequence[str]], *, max_seq_length: int,
                       max_characters: int) -> dict[str, np.ndarray]:
  """Word lists -> `char_ids [batch, max_seq_length, chars]`, `lengths [batch]` and `word_mask [batch,
  max_seq_length]` (1 at the words, 0 at `<S>`, `</S>` and padding); words beyond `max_seq_length - 2` are cut."""
  words = sorted({w for sentence in sentences for w in sentence})
  index = {w: i + 2 for i, w in enumerate(words)}
  table = np.stack([tokenizer.word_char_ids(w, max_characters) for w in (tokenizer.BOS, tokenizer.EOS, *words)])
  rows = [np.asarray([index[w] for w in sentence], np.int64) for sentence in sentences]
  batch = pretrain_data.rows_to_batch(rows, max_seq_length=max_seq_length, char_table=table, bos_id=0, eos_id=1)
  t = np.arange(max_seq_length)[None, :]
  word_mask = (t >= 1) & (t < batch['lengths'][:, None] - 1)
  return {'char_ids': batch['char_ids'], 'lengths': batch['lengths'], 'word_mask': word_mask.astype(np.int32)}


def make_layer_features(bilm: BiLM):
  """A jitted `(params, char_ids, lengths) -> [1 + n_lstm_layers, batch, length, 2 P]` float32."""
  model = elmo_model.ElmoBiLM(bilm.config)
  return jax.jit(lambda params, char_ids, lengths: model.apply(
      {'params': params}, char_ids, lengths, method=elmo_model.ElmoBiLM.features))


def iter_features(bilm: BiLM, sentences: Iterable[tuple[Any, Sequence[str]]], *, max_seq_length: int = 64,
                  batch_size: int = 16) -> Iterator[tuple[Any, list[str], np.ndarray]]:
  """`(key, words)` pairs -> `(key, words kept, features [1 + n_lstm_layers, len(words kept), 2 P] float32)` in
  order; a sentence keeps its first `max_seq_length - 2` words. One compiled shape: the last batch is padded with
  copies of its first sentence."""
  forward = make_layer_features(bilm)
  params = jax.device_put(bilm.params)
  iterator = iter(sentences)
  while chunk := list(itertools.islice(iterator, batch_size)):
    words = [list(w)[:max_seq_length - 2] for _, w in chunk]
    padded = words + [words[0]] * (batch_size - len(chunk))
    batch = sentences_to_batch(padded, max_seq_length=max_seq_length,
                               max_characters=int(bilm.config.max_characters_per_token))
    layers = np.asarray(forward(params, jnp.asarray(batch['char_ids']), jnp.asarray(batch['lengths'])))
    for row, (key, _) in enumerate(chunk):
      yield key, words[row], layers[:, row, 1:1 + len(words[row])]


def sentence_features(bilm: BiLM, sentences: Sequence[Sequence[str]], *, max_seq_length: int = 64,
                      batch_size: int = 16) -> list[np.ndarray]:
  """Features of every sentence: `[1 + n_lstm_layers, n_words, 2 P]` float32 each (`iter_features`)."""
  return [f for _, _, f in iter_features(bilm, enumerate(sentences), max_seq_length=max_seq_length,
                                         batch_size=batch_size)]
