"""GPT-2's byte-level BPE with HF `tokenizers`: train one on a corpus, or load a `vocab.json` + `merges.txt` pair
(GPT-2's own files, or ours).

Text is split by GPT-2's pre-tokenisation regex, every byte of a piece is mapped to a printable character (the
byte-level alphabet, so nothing is ever unknown), and the merges are applied. No prefix space is added and no
special token is inserted by `encode`; `<|endoftext|>` is the one special token (GPT-2's end of text), which the
pretraining data puts between documents and generation stops at. `transformers.GPT2Tokenizer` loads the saved files
and gives the same ids.

A trained vocabulary has `<|endoftext|>` at id 0, then the 256 byte characters, then the merges in the order they
were learned; GPT-2's own files have it last (50256).
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterable, Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from common import storage

END_OF_TEXT = '<|endoftext|>'
VOCAB_NAME = 'vocab.json'
MERGES_NAME = 'merges.txt'


def merges_path(vocab_file: str) -> str:
  """The `merges.txt` that belongs to `vocab_file` (the same directory)."""
  return storage.join(storage.dirname(vocab_file), MERGES_NAME)


def _pipeline(model: models.Model) -> Tokenizer:
  tokenizer = Tokenizer(model)
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tokenizer.decoder = decoders.ByteLevel()
  return tokenizer


class ByteLevelBPETokenizer:
  """A loaded byte-level BPE (`vocab.json` + `merges.txt`). Encoding adds no special token."""

  def __init__(self, vocab_file: str):
    if storage.isdir(vocab_file):
      vocab_file = storage.join(vocab_file, VOCAB_NAME)
    self.vocab_file = vocab_file
    merges_file = merges_path(vocab_file)
    for path in (vocab_file, merges_file):
      if not storage.isfile(path):
        raise FileNotFoundError(f'{path}: no such file (a byte-level BPE needs {VOCAB_NAME} and {MERGES_NAME})')
    self._vocab_text = storage.read_text(vocab_file)
    self._merges_text = storage.read_text(merges_file)
    vocab = json.loads(self._vocab_text)
    if END_OF_TEXT not in vocab:
      raise ValueError(f'{vocab_file} has no {END_OF_TEXT} token')
    merges = [tuple(line.split(' ')) for line in self._merges_text.splitlines()
              if line and not line.startswith('#version')]
    self._tokenizer = _pipeline(models.BPE(vocab=vocab, merges=merges))
    self._tokenizer.add_special_tokens([END_OF_TEXT])
    self.id_to_token = sorted(vocab, key=vocab.get)  # id -> token
    self.vocab_size = len(self.id_to_token)
    self.eot_id = vocab[END_OF_TEXT]  # the id of `<|endoftext|>`

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

  def digest(self) -> str:
    """A hash of the vocabulary and the merges, for fingerprints."""
    return hashlib.sha256((self._vocab_text + '\0' + self._merges_text).encode()).hexdigest()[:32]

  def save(self, out_dir: str) -> str:
    """Writes `vocab.json` and `merges.txt` into `out_dir`; returns the `vocab.json` path."""
    storage.makedirs(out_dir)
    vocab_file = storage.join(out_dir, VOCAB_NAME)
    if not storage.same_file(self.vocab_file, vocab_file):
      storage.write_text(vocab_file, self._vocab_text)
      storage.write_text(storage.join(out_dir, MERGES_NAME), self._merges_text)
    return vocab_file

  def __repr__(self) -> str:
    return f'ByteLevelBPETokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})'


def load_tokenizer(vocab_file: str) -> ByteLevelBPETokenizer:
  """The tokenizer of `vocab_file` (a `vocab.json`, or a directory holding it) and the `merges.txt` beside it."""
  return ByteLevelBPETokenizer(vocab_file)


def _training_lines(files: Sequence[str]) -> Iterator[str]:
  from common.data import corpus  # pylint: disable=import-outside-toplevel
  for document in corpus.iter_documents(files):
    yield ' '.join(document)


def train_bpe(files: Sequence[str] | str, vocab_size: int, out_dir: str, *, min_frequency: int = 2) -> str:
  """Trains a byte-level BPE of at most `vocab_size` tokens on corpus files (one sentence a line, a blank line
  between documents; a document's sentences are joined by spaces) and writes `vocab.json` + `merges.txt` into
  `out_dir`; returns the `vocab.json` path."""
  if isinstance(files, str):
    files = [files]
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size <= len(alphabet) + 1:
    raise ValueError(f'vocab_size must exceed the {len(alphabet)} byte characters and {END_OF_TEXT}, got '
                     f'{vocab_size}')
  tokenizer = _pipeline(models.BPE())
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[END_OF_TEXT],
                                initial_alphabet=alphabet, show_progress=False)
  tokenizer.train_from_iterator(_training_lines(files), trainer=trainer)
  storage.makedirs(out_dir)
  model = json.loads(tokenizer.to_str())['model']
  merges = [m if isinstance(m, str) else ' '.join(m) for m in model['merges']]
  vocab_file = storage.join(out_dir, VOCAB_NAME)
  storage.write_text(vocab_file, json.dumps(model['vocab'], ensure_ascii=False))
  storage.write_text(storage.join(out_dir, MERGES_NAME), '#version: 0.2\n' + ''.join(m + '\n' for m in merges))
  return vocab_file
