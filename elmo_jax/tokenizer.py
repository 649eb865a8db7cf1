"""ELMo's two vocabularies: words for the softmax, characters for the token encoder (as allenai/bilm-tf).

Words: a `vocab.txt` with one word a line, `<S>`, `</S>`, `<UNK>` first (ids 0, 1, 2), then the corpus words by
falling count (ties in code-point order), at most `vocab_size` lines in all. Text is split into words at white space
and around punctuation (`split_words`); a word not in the vocabulary is `<UNK>` for the softmax.

Characters: a word is `max_characters` ids: begin-of-word (258), its UTF-8 bytes (0..255, at most
`max_characters - 2`), end-of-word (259), then padding (260); `<S>` and `</S>` are the single "characters" 256 and
257 between the word markers. These are the reference's training ids (its inference batcher adds 1 to leave 0 for
masked positions; `elmo_jax.weights` handles that difference in the weight files).
"""
from __future__ import annotations

import collections
import functools
import hashlib
import json
import re
from typing import Iterable, Sequence

import numpy as np

from common import storage

BOS, EOS, UNK = '<S>', '</S>', '<UNK>'
SPECIAL_WORDS = (BOS, EOS, UNK)
VOCAB_FILE = 'vocab.txt'

BOS_CHAR, EOS_CHAR, BOW_CHAR, EOW_CHAR, PAD_CHAR = 256, 257, 258, 259, 260

_WORD_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def split_words(text: str) -> list[str]:
  """Words of a sentence: runs of letters/digits/underscore, and every other non-space character on its own."""
  return _WORD_RE.findall(text)


def word_char_ids(word: str, max_characters: int) -> np.ndarray:
  """The character ids of one word: `[max_characters] int32` (see the module docstring)."""
  if word == BOS:
    inner = [BOS_CHAR]
  elif word == EOS:
    inner = [EOS_CHAR]
  else:
    inner = list(word.encode('utf-8', 'ignore')[:max_characters - 2])
  ids = np.full([max_characters], PAD_CHAR, np.int32)
  ids[0] = BOW_CHAR
  ids[1:1 + len(inner)] = inner
  ids[1 + len(inner)] = EOW_CHAR
  return ids


def sentence_char_ids(words: Sequence[str], max_characters: int) -> np.ndarray:
  """`<S> words </S>` as character ids: `[len(words) + 2, max_characters] int32`."""
  return np.stack([word_char_ids(w, max_characters) for w in (BOS, *words, EOS)])


class WordVocabulary:
  """The word vocabulary (ids for the softmax) with each word's character ids at hand."""

  def __init__(self, words: Sequence[str]):
    words = list(words)
    if tuple(words[:3]) != SPECIAL_WORDS:
      raise ValueError(f'a vocabulary starts with {SPECIAL_WORDS}, got {words[:3]}')
    if len(set(words)) != len(words):
      raise ValueError('the vocabulary has a word twice')
    self._words = words
    self._ids = {w: i for i, w in enumerate(words)}

  @property
  def vocab_size(self) -> int:
    return len(self._words)

  @property
  def id_to_token(self) -> list[str]:
    return list(self._words)

  @property
  def bos_id(self) -> int:
    return 0

  @property
  def eos_id(self) -> int:
    return 1

  @property
  def unk_id(self) -> int:
    return 2

  @property
  def pad_id(self) -> int:
    return 0  # padding positions are masked out; their id is never read

  def encode(self, text: str) -> list[int]:
    """Word ids of one sentence (no `<S>`/`</S>`)."""
    return [self._ids.get(w, self.unk_id) for w in split_words(text)]

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  @functools.lru_cache(maxsize=4)
  def char_table(self, max_characters: int) -> np.ndarray:
    """The character ids of every word: `[vocab_size, max_characters] int32`."""
    return np.stack([word_char_ids(w, max_characters) for w in self._words])

  def digest(self) -> str:
    return hashlib.sha256(json.dumps(self._words).encode()).hexdigest()[:32]

  def save(self, out_dir: str) -> str:
    """Writes `out_dir/vocab.txt`; returns its path."""
    storage.makedirs(out_dir)
    path = storage.join(out_dir, VOCAB_FILE)
    storage.write_text(path, ''.join(w + '\n' for w in self._words))
    return path

  def __repr__(self) -> str:
    return f'WordVocabulary(vocab_size={self.vocab_size})'


def load_vocabulary(path: str) -> WordVocabulary:
  """A `vocab.txt` (or a directory holding one) in the reference's format."""
  if storage.isdir(path):
    path = storage.join(path, VOCAB_FILE)
  words = [line.strip() for line in storage.read_text(path).splitlines() if line.strip()]
  return WordVocabulary(words)


def train_vocabulary(files: Sequence[str], vocab_size: int, out_dir: str) -> str:
  """Counts the words of the corpus files; writes the `vocab_size` most frequent (specials first) to
  `out_dir/vocab.txt` and returns its path."""
  from common.data import corpus  # pylint: disable=import-outside-toplevel
  if vocab_size <= len(SPECIAL_WORDS):
    raise ValueError(f'vocab_size must exceed the {len(SPECIAL_WORDS)} special words, got {vocab_size}')
  counts: collections.Counter = collections.Counter()
  for document in corpus.iter_documents(list(files)):
    for sentence in document:
      counts.update(split_words(sentence))
  for word in SPECIAL_WORDS:
    counts.pop(word, None)
  ranked = sorted(counts, key=lambda w: (-counts[w], w))
  words = list(SPECIAL_WORDS) + ranked[:vocab_size - len(SPECIAL_WORDS)]
  return WordVocabulary(words).save(out_dir)
