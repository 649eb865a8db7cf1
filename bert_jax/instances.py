"""BERT pretraining instances from tokenised documents: pure functions of (documents, settings, generator).

Instances follow the original `create_pretraining_data.py`:
  * target length `max_seq_length - 3`, replaced with probability `short_seq_prob` by a uniform length in
    `[2, max_seq_length - 3]`, drawn once per document (as the original does);
  * whole sentences accumulate into a chunk until it reaches the target or the document ends; a split point
    `a_end` uniform in `[1, len(chunk) - 1]` ends segment A;
  * NSP: with probability 1/2 (always when the chunk is a single sentence) B is text from a random *other*
    document, starting at a random sentence and long enough for the target; the chunk's sentences after `a_end`
    that were not used are "put back" and start the next chunk. Otherwise B is the rest of the chunk. Label 1 means
    "B is random", as the original `next_sentence_labels`. Because single-sentence chunks are always random, corpora
    of short documents get more than half random B (about 61 % on the embedded corpus at length 128);
  * the pair is truncated to `max_seq_length - 3` tokens by repeatedly removing a token from the longer segment
    (A on ties), from its front or back with probability 1/2 each; both segments stay non-empty;
  * `next_sentence=False` (RoBERTa-style FULL-SENTENCES, kept within a document): whole sentences are packed into
    `[CLS] text [SEP]` up to `max_seq_length - 2` tokens (or the short target), sentences longer than that are split;
    all segment ids 0 and label 0 (the NSP label is present in the batch but meaningless; the objective ignores it).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np



def truncate_seq_pair(tokens_a: np.ndarray, tokens_b: np.ndarray, max_num_tokens: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Shortens the pair to at most `max_num_tokens` tokens in all.

  Equivalent in distribution to removing one token at a time from the longer segment (A on ties), from its front
  or back with probability 1/2: the final lengths are fixed by that rule, and the number of tokens removed from
  the front of a segment that loses `k` is Binomial(k, 1/2).
  """
  la, lb = len(tokens_a), len(tokens_b)
  excess = la + lb - max_num_tokens
  if excess <= 0:
    return tokens_a, tokens_b
  cut_a = cut_b = 0
  gap = abs(la - lb)
  first = min(excess, gap)
  if la >= lb:
    cut_a += first
  else:
    cut_b += first
  rest = excess - first  # Now equal lengths: removals alternate, A first.
  cut_a += (rest + 1) // 2
  cut_b += rest // 2

  def cut(tokens, k):
    if k == 0:
      return tokens
    front = int(rng.binomial(k, 0.5))
    return tokens[front:len(tokens) - (k - front)]

  return cut(tokens_a, cut_a), cut(tokens_b, cut_b)


def _concat(pieces: Sequence[np.ndarray]) -> np.ndarray:
  return np.concatenate(pieces).astype(np.int32, copy=False) if pieces else np.zeros([0], np.int32)


def _other_document(rng: np.random.Generator, num_documents: int, document_index: int) -> int:
  if num_documents <= 1:
    return document_index
  other = int(rng.integers(num_documents - 1))
  return other + (other >= document_index)


def create_instances_from_document(all_documents: Sequence[Sequence[np.ndarray]], document_index: int, *,
                                   max_seq_length: int, short_seq_prob: float, rng: np.random.Generator, cls_id: int,
                                   sep_id: int, next_sentence: bool = True) -> list[dict[str, Any]]:
  """Cuts one document into pretraining instances (algorithm in the module docstring).

  Args:
    all_documents: documents, each a list of non-empty sentences, each a `[n] int` array of token ids (no specials).
    document_index: the document to cut; the others only supply random B segments.
  Returns:
    instances `{'input_ids': [n] int32 ([CLS] A [SEP] B [SEP], n <= max_seq_length), 'num_a': int (tokens with
    segment id 0: len(A) + 2), 'next_sentence_label': 0 or 1 (1 = B is random)}`.
  """
  document = all_documents[document_index]
  cls = np.asarray([cls_id], np.int32)
  sep = np.asarray([sep_id], np.int32)
  if not next_sentence:
    return _full_sentence_instances(document, max_seq_length, short_seq_prob, rng, cls, sep)

  max_num_tokens = max_seq_length - 3
  target_seq_length = max_num_tokens
  if rng.random() < short_seq_prob:
    target_seq_length = int(rng.integers(2, max_num_tokens + 1))

  instances = []
  chunk: list[np.ndarray] = []
  chunk_length = 0
  i = 0
  while i < len(document):
    chunk.append(document[i])
    chunk_length += len(document[i])
    if i == len(document) - 1 or chunk_length >= target_seq_length:
      a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
      tokens_a = _concat(chunk[:a_end])
      if len(chunk) == 1 or rng.random() < 0.5:
        is_random_next = 1
        target_b_length = target_seq_length - len(tokens_a)
        random_document = all_documents[_other_document(rng, len(all_documents), document_index)]
        pieces, length = [], 0
        for j in range(int(rng.integers(len(random_document))), len(random_document)):
          pieces.append(random_document[j])
          length += len(random_document[j])
          if length >= target_b_length:
            break
        tokens_b = _concat(pieces)
        i -= len(chunk) - a_end  # Put back the unused sentences: they start the next chunk.
      else:
        is_random_next = 0
        tokens_b = _concat(chunk[a_end:])
      tokens_a, tokens_b = truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
      assert len(tokens_a) >= 1 and len(tokens_b) >= 1
      instances.append({'input_ids': np.concatenate([cls, tokens_a, sep, tokens_b, sep]),
                        'num_a': len(tokens_a) + 2, 'next_sentence_label': is_random_next})
      chunk, chunk_length = [], 0
    i += 1
  return instances


def _full_sentence_instances(document, max_seq_length, short_seq_prob, rng, cls, sep) -> list[dict[str, Any]]:
  """`[CLS] sentences... [SEP]` packed greedily up to the target length; over-long sentences are split."""
  max_num_tokens = max_seq_length - 2
  target = max_num_tokens
  if rng.random() < short_seq_prob:
    target = int(rng.integers(2, max_num_tokens + 1))
  instances, chunk, chunk_length = [], [], 0

  def emit():
    tokens = _concat(chunk)
    instances.append({'input_ids': np.concatenate([cls, tokens, sep]), 'num_a': len(tokens) + 2,
                      'next_sentence_label': 0})

  for sentence in document:
    for start in range(0, len(sentence), max_num_tokens):
      piece = sentence[start:start + max_num_tokens]
      if chunk and chunk_length + len(piece) > target:
        emit()
        chunk, chunk_length = [], 0
      chunk.append(piece)
      chunk_length += len(piece)
  if chunk:
    emit()
  return instances
