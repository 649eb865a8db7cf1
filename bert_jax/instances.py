"""BERT pretraining instances from tokenised documents: pure functions of (documents, settings, generator).

Instances follow the original `create_pretraining_data.py`:
  * target length `max_seq_length - 3`, replaced with probability `short_seq_prob` by a uniform length in
    `[2, max_seq_length - 3]`, drawn once per document (as the original does);
  * whole sentences accumulate into a chunk until it reaches the target or the document ends; a split point
    `a_end` uniform in `[1, len(chunk) - 1]` ends segment A;
  * NSP: with probability 1/2 B is text from a random *other* document, starting at a random sentence and long
    enough for the target; the chunk's sentences after `a_end` that were not used are "put back" and start the
    next chunk. Otherwise B is the rest of the chunk. Label 1 means "B is random", as the original
    `next_sentence_labels`;
  * a chunk of a single sentence (common with short documents at short lengths) is split inside the sentence
    instead, at a token uniform in `[1, len - 1]`: A is the sentence's head, B its tail or (probability 1/2) random
    text that also starts inside a sentence (at a uniform token of its first sentence, past the first), so neither
    where A ends nor where B starts tells the label. The original always pairs such a chunk with a random B, which
    leaves corpora of short documents with mostly random B: on the embedded corpus at length 64, 24 % (train) and
    26 % (eval) of chunks are a single sentence and 61 % and 63 % of instances random, a majority class the model
    can only match. Only a one-token sentence still gets a random B;
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
      inside = len(chunk) == 1 and len(chunk[0]) >= 2  # Split inside the sentence (module docstring).
      if inside:
        cut = int(rng.integers(1, len(chunk[0])))
        tokens_a, rest = chunk[0][:cut], chunk[0][cut:]
        is_random_next = int(rng.random() < 0.5)
      else:
        a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
        tokens_a, rest = _concat(chunk[:a_end]), _concat(chunk[a_end:])
        is_random_next = int(len(chunk) == 1 or rng.random() < 0.5)
      if is_random_next:
        random_document = all_documents[_other_document(rng, len(all_documents), document_index)]
        tokens_b = _random_segment(random_document, target_seq_length - len(tokens_a), rng, inside)
        if not inside:
          i -= len(chunk) - a_end  # Put back the unused sentences: they start the next chunk.
      else:
        tokens_b = rest
      tokens_a, tokens_b = truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
      assert len(tokens_a) >= 1 and len(tokens_b) >= 1
      instances.append({'input_ids': np.concatenate([cls, tokens_a, sep, tokens_b, sep]),
                        'num_a': len(tokens_a) + 2, 'next_sentence_label': is_random_next})
      chunk, chunk_length = [], 0
    i += 1
  return instances


def _random_segment(document: Sequence[np.ndarray], target_length: int, rng: np.random.Generator,
                    inside: bool) -> np.ndarray:
  """Sentences of `document` from a random one on, until `target_length` tokens; with `inside` the first sentence
  starts at a uniform token past its first (when it has two or more), as a B cut inside a sentence does."""
  start = int(rng.integers(len(document)))
  first = document[start]
  if inside and len(first) >= 2:
    first = first[int(rng.integers(1, len(first))):]
  pieces, length = [first], len(first)
  for j in range(start + 1, len(document)):
    if length >= target_length:
      break
    pieces.append(document[j])
    length += len(document[j])
  return _concat(pieces)


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
