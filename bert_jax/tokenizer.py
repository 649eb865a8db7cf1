"""BERT WordPiece tokenization on the HF `tokenizers` library, with the original BERT behaviour.

The original `FullTokenizer` runs a BasicTokenizer then WordPiece:

1. clean text: drop NUL, U+FFFD and control characters (Unicode category C*, except tab/newline/CR); turn
   whitespace (space, tab, newline, CR, category Zs) into spaces;
2. put spaces around CJK ideographs;
3. split on whitespace; with `do_lower_case`, lower-case each word and strip accents (NFD, drop category Mn);
4. split every punctuation character (ASCII symbols and category P*) into its own word;
5. WordPiece: greedy longest-match-first against the vocabulary, continuation pieces prefixed `##`; a word longer
   than 100 characters, or one that cannot be covered, becomes `[UNK]`.

`tokenizers` implements the same steps in Rust (`BertNormalizer` + `BertPreTokenizer` + `WordPiece`) and that is the
fast path. Its Unicode tables and its lower-casing differ from Python's in a few corners (characters unassigned or
recently assigned, Greek capital sigma, whose Python lower-case depends on context), so every character is checked
once against the reference Python implementation (`basic_tokenize`, below) on small probe strings; a text holding a
character that fails is pre-tokenized in Python and only its WordPiece step runs in Rust. Ids therefore match the
original tokenizer (the tests check every BMP code point), and ASCII text never leaves Rust.

Literal special-token strings in the text (`"[MASK]"`) are ordinary text here, as in the original: they never turn
into special ids. Special-token ids come from the vocabulary file, never from constants.
"""
from __future__ import annotations

import collections
import json
import unicodedata
from typing import Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from common import storage

PAD, UNK, CLS, SEP, MASK = '[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
CONTINUATION_PREFIX = '##'
MAX_INPUT_CHARS_PER_WORD = 100
VOCAB_FILE = 'vocab.txt'
CONFIG_FILE = 'tokenizer_config.json'

# ---------------------------------------------------------------------------------------------------------------------
# Reference BasicTokenizer (the original algorithm, in Python)
# ---------------------------------------------------------------------------------------------------------------------

# CJK Unified Ideographs blocks and extensions, and compatibility ideographs (Hangul, kana are not included).
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_whitespace(ch: str) -> bool:
  return ch in ' \t\n\r' or unicodedata.category(ch) == 'Zs'


def _is_control(ch: str) -> bool:
  return ch not in '\t\n\r' and unicodedata.category(ch).startswith('C')


def _is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith('P')


def _is_cjk(ch: str) -> bool:
  cp = ord(ch)
  return any(low <= cp <= high for low, high in _CJK_RANGES)


def _split_on_punctuation(word: str) -> list[str]:
  pieces, current = [], []
  for ch in word:
    if _is_punctuation(ch):
      if current:
        pieces.append(''.join(current))
        current = []
      pieces.append(ch)
    else:
      current.append(ch)
  if current:
    pieces.append(''.join(current))
  return pieces


def basic_tokenize(text: str, do_lower_case: bool = True) -> list[str]:
  """The original BERT BasicTokenizer: steps 1-4 of the module docstring. Returns the words WordPiece will see."""
  cleaned = []
  for ch in text:
    if ch == '\x00' or ch == '\ufffd' or _is_control(ch):
      continue
    if _is_whitespace(ch):
      cleaned.append(' ')
    elif _is_cjk(ch):
      cleaned.extend((' ', ch, ' '))
    else:
      cleaned.append(ch)
  pieces = []
  for word in ''.join(cleaned).split():
    if do_lower_case:
      word = ''.join(ch for ch in unicodedata.normalize('NFD', word.lower()) if unicodedata.category(ch) != 'Mn')
    pieces.extend(_split_on_punctuation(word))
  return ' '.join(pieces).split()


# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary files
# ---------------------------------------------------------------------------------------------------------------------

def read_vocab(vocab_file: str) -> list[str]:
  """Tokens of a `vocab.txt` (one per line, line number = id), validated.

  Raises ValueError naming the file when it is missing or unreadable, holds a duplicate token, or lacks one of
  `[PAD] [UNK] [CLS] [SEP] [MASK]`.
  """
  if not storage.isfile(vocab_file):
    raise ValueError(f'vocabulary file {vocab_file!r} does not exist')
  try:
    tokens = [line.rstrip('\r') for line in storage.read_text(vocab_file).split('\n')]
    if tokens and tokens[-1] == '':
      tokens.pop()  # The newline that ends the last line.
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f'vocabulary file {vocab_file!r} cannot be read as UTF-8 text: {e}') from e
  first_line = {}
  for line_number, token in enumerate(tokens, 1):
    if token in first_line:
      raise ValueError(f'vocabulary file {vocab_file!r}: token {token!r} appears twice '
                       f'(lines {first_line[token]} and {line_number})')
    first_line[token] = line_number
  for token in SPECIAL_TOKENS:
    if token not in first_line:
      raise ValueError(f'vocabulary file {vocab_file!r} has no {token} token (needed: {" ".join(SPECIAL_TOKENS)})')
  return tokens


def write_vocab(tokens: Sequence[str], vocab_file: str) -> str:
  storage.write_text(vocab_file, ''.join(f'{token}\n' for token in tokens))
  return vocab_file


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------

def _bert_pipeline(vocab: dict[str, int], do_lower_case: bool) -> Tokenizer:
  """The Rust pipeline: BertNormalizer + BertPreTokenizer + WordPiece, no special-token handling."""
  tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD))
  tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                    lowercase=do_lower_case)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
  return tokenizer


# Probe strings a character must pass (Rust words == Python words) to be handled by the Rust pipeline.
_PROBES = ('A{c}b {c} x{c}{c}', '{c}Q {c}{c}z')


class WordPieceTokenizer:
  """A BERT WordPiece tokenizer equal, id for id, to the original `FullTokenizer` (see the module docstring).

  Built by `load_tokenizer`. Encoding methods add no special tokens.
  """

  def __init__(self, tokens: Sequence[str], do_lower_case: bool = True):
    self._id_to_token = list(tokens)
    self._vocab = {token: i for i, token in enumerate(self._id_to_token)}
    self._do_lower_case = bool(do_lower_case)
    self._tokenizer = _bert_pipeline(self._vocab, self._do_lower_case)
    # WordPiece alone, for words the Python BasicTokenizer produced.
    self._wordpiece = Tokenizer(models.WordPiece(self._vocab, unk_token=UNK,
                                                 max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD))
    self._is_continuation = np.array([t.startswith(CONTINUATION_PREFIX) for t in self._id_to_token], dtype=bool)
    self._safe_chars: set[str] = set()
    self._unsafe_chars: set[str] = set()
    self._ascii_safe = all(self._check_char(chr(cp)) for cp in range(128))

  # -- routing between the Rust pipeline and the Python BasicTokenizer --------------------------------------------

  def _rust_words(self, text: str) -> list[str]:
    normalized = self._tokenizer.normalizer.normalize_str(text)
    return [word for word, _ in self._tokenizer.pre_tokenizer.pre_tokenize_str(normalized)]

  def _check_char(self, ch: str) -> bool:
    """Whether the Rust pipeline treats `ch` as the reference does on the probe strings (cached). Capital sigma never
    qualifies when lower-casing: Python maps it to final or medial sigma depending on its neighbours."""
    if ch in self._safe_chars:
      return True
    if ch in self._unsafe_chars:
      return False
    try:
      safe = not (self._do_lower_case and ch == '\u03a3') and all(
          self._rust_words(p.format(c=ch)) == basic_tokenize(p.format(c=ch), self._do_lower_case) for p in _PROBES)
    except Exception:  # A lone surrogate cannot even cross into Rust.
      safe = False
    (self._safe_chars if safe else self._unsafe_chars).add(ch)
    return safe

  def _rust_handles(self, text: str) -> bool:
    if text.isascii() and self._ascii_safe:
      return True
    chars = set(text)
    if chars <= self._safe_chars:
      return True
    return all(self._check_char(ch) for ch in chars - self._safe_chars)

  def _encode_one(self, text: str):
    if self._rust_handles(text):
      return self._tokenizer.encode(text, add_special_tokens=False)
    return self._wordpiece.encode(basic_tokenize(text, self._do_lower_case), is_pretokenized=True,
                                  add_special_tokens=False)

  # -- public API ------------------------------------------------------------------------------------------------------

  def tokenize(self, text: str) -> list[str]:
    """WordPiece tokens of `text`, e.g. `['un', '##aff', '##able']`."""
    return self._encode_one(text).tokens

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without `[CLS]`/`[SEP]`."""
    return self._encode_one(text).ids

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    """Token ids of every text (Rust, multi-threaded batch encoding); same result as `encode` on each."""
    texts = list(texts)
    results: list[list[int] | None] = [None] * len(texts)
    rust, python = [], []
    for i, text in enumerate(texts):
      (rust if self._rust_handles(text) else python).append(i)
    if rust:
      batch = [texts[i] for i in rust]
      encode = getattr(self._tokenizer, 'encode_batch_fast', self._tokenizer.encode_batch)
      for i, encoding in zip(rust, encode(batch, add_special_tokens=False)):
        results[i] = encoding.ids
    if python:
      words = [basic_tokenize(texts[i], self._do_lower_case) for i in python]
      for i, encoding in zip(python, self._wordpiece.encode_batch(words, is_pretokenized=True,
                                                                  add_special_tokens=False)):
        results[i] = encoding.ids
    return results

  def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
    """Ids of vocabulary tokens; a token not in the vocabulary maps to `[UNK]`."""
    unk = self.unk_id
    return [self._vocab.get(token, unk) for token in tokens]

  def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
    """Tokens of ids; raises ValueError for an id outside `[0, vocab_size)`."""
    size = len(self._id_to_token)
    tokens = []
    for i in ids:
      i = int(i)
      if not 0 <= i < size:
        raise ValueError(f'token id {i} is outside the vocabulary [0, {size})')
      tokens.append(self._id_to_token[i])
    return tokens

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ids: pieces joined, `##` continuations glued to the previous piece (lossy, for display)."""
    return ' '.join(self.convert_ids_to_tokens(ids)).replace(f' {CONTINUATION_PREFIX}', '').strip()

  @property
  def vocab(self) -> dict[str, int]:
    """Token -> id (do not modify)."""
    return self._vocab

  @property
  def id_to_token(self) -> list[str]:
    """Id -> token (do not modify)."""
    return self._id_to_token

  @property
  def vocab_size(self) -> int:
    return len(self._id_to_token)

  @property
  def do_lower_case(self) -> bool:
    return self._do_lower_case

  @property
  def pad_id(self) -> int:
    return self._vocab[PAD]

  @property
  def unk_id(self) -> int:
    return self._vocab[UNK]

  @property
  def cls_id(self) -> int:
    return self._vocab[CLS]

  @property
  def sep_id(self) -> int:
    return self._vocab[SEP]

  @property
  def mask_id(self) -> int:
    return self._vocab[MASK]

  @property
  def special_ids(self) -> np.ndarray:
    """[5] int32 ids of `[PAD] [UNK] [CLS] [SEP] [MASK]`."""
    return np.array([self._vocab[t] for t in SPECIAL_TOKENS], dtype=np.int32)

  @property
  def is_continuation(self) -> np.ndarray:
    """[vocab_size] bool: the token starts with `##` (continues the previous word; used by whole-word masking)."""
    return self._is_continuation

  def save(self, out_dir: str, model_max_length: int = 512) -> str:
    """Writes `vocab.txt` and a `tokenizer_config.json` that `transformers.BertTokenizer(Fast).from_pretrained`
    reads; returns the vocabulary path."""
    storage.makedirs(out_dir)
    vocab_file = write_vocab(self._id_to_token, storage.join(out_dir, VOCAB_FILE))
    config = dict(tokenizer_class='BertTokenizer', do_lower_case=self._do_lower_case, do_basic_tokenize=True,
                  tokenize_chinese_chars=True, strip_accents=None, unk_token=UNK, sep_token=SEP, pad_token=PAD,
                  cls_token=CLS, mask_token=MASK, model_max_length=int(model_max_length),
                  clean_up_tokenization_spaces=True)
    storage.write_text(storage.join(out_dir, CONFIG_FILE), json.dumps(config, indent=2) + '\n')
    return vocab_file

  def __repr__(self) -> str:
    return f'WordPieceTokenizer(vocab_size={self.vocab_size}, do_lower_case={self._do_lower_case})'


def read_tokenizer_json(path: str) -> tuple[list[str], bool]:
  """(tokens by id, lower-casing) of a Hugging Face `tokenizer.json` with a WordPiece model (the vocabulary a
  `vocab.txt` would hold; lower-casing from its BertNormalizer, True when it has none). Raises ValueError naming
  the file when it is not a WordPiece tokenizer, its ids are not 0..V-1, or it lacks a special token."""
  try:
    with open(path, encoding='utf-8') as f:
      spec = json.load(f)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise ValueError(f'{path!r} cannot be read as a tokenizer.json: {e}') from e
  model = spec.get('model') or {}
  if model.get('type') != 'WordPiece' or not isinstance(model.get('vocab'), dict):
    raise ValueError(f'{path!r}: not a WordPiece tokenizer (model type {model.get("type")!r})')
  vocab = model['vocab']
  tokens = [None] * len(vocab)
  for token, index in vocab.items():
    if not isinstance(index, int) or not 0 <= index < len(tokens) or tokens[index] is not None:
      raise ValueError(f'{path!r}: token ids are not 0..{len(tokens) - 1} (id {index!r} of {token!r})')
    tokens[index] = token
  for token in SPECIAL_TOKENS:
    if token not in vocab:
      raise ValueError(f'{path!r} has no {token} token (needed: {" ".join(SPECIAL_TOKENS)})')
  normalizer = spec.get('normalizer') or {}
  parts = normalizer.get('normalizers', [normalizer]) if normalizer.get('type') == 'Sequence' else [normalizer]
  lower = [n.get('lowercase') for n in parts if n and n.get('type') == 'BertNormalizer']
  lower += [True for n in parts if n and n.get('type') == 'Lowercase']
  return tokens, bool(lower[0]) if lower else True


def tokenizer_from_json(path: str, do_lower_case: bool | None = None) -> WordPieceTokenizer:
  """A `WordPieceTokenizer` over the vocabulary of a `tokenizer.json` (see `read_tokenizer_json`); `do_lower_case`
  None follows the file's normaliser."""
  tokens, lower = read_tokenizer_json(path)
  return WordPieceTokenizer(tokens, do_lower_case=lower if do_lower_case is None else do_lower_case)


def load_tokenizer(vocab_file: str, do_lower_case: bool = True) -> WordPieceTokenizer:
  """A `WordPieceTokenizer` over `vocab_file` (a `vocab.txt`, or a directory holding one)."""
  if storage.isdir(vocab_file):
    vocab_file = storage.join(vocab_file, VOCAB_FILE)
  return WordPieceTokenizer(read_vocab(vocab_file), do_lower_case=do_lower_case)


# ---------------------------------------------------------------------------------------------------------------------
# Training a vocabulary
# ---------------------------------------------------------------------------------------------------------------------

def _training_lines(files: Sequence[str]) -> Iterator[str]:
  from common.data import corpus  # pylint: disable=import-outside-toplevel
  for document in corpus.iter_documents(files):
    yield from document


def _batched(lines: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
  batch = []
  for line in lines:
    batch.append(line)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def _training_alphabet(files: Sequence[str], do_lower_case: bool, limit_alphabet: int | None) -> list[str]:
  """The characters of the normalized text, the `limit_alphabet` most frequent (ties by code point), sorted."""
  normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                          lowercase=do_lower_case)
  counts = collections.Counter()
  for batch in _batched(_training_lines(files)):
    counts.update(normalizer.normalize_str(' '.join(batch)))
  counts.pop(' ', None)
  ranked = sorted(counts, key=lambda ch: (-counts[ch], ch))
  return sorted(ranked[:limit_alphabet] if limit_alphabet is not None else ranked)


def train_wordpiece(files: Sequence[str], vocab_size: int, out_dir: str, *, do_lower_case: bool = True,
                    min_frequency: int = 2, limit_alphabet: int | None = 1000) -> str:
  """Trains a WordPiece vocabulary on text files in the BERT format (globs and `.gz` accepted, bad lines skipped).

  Layout: ids 0-4 are `[PAD] [UNK] [CLS] [SEP] [MASK]`, then the alphabet (the `limit_alphabet` most frequent
  characters, sorted by code point), then `##` + each alphabet character that can continue a word (not punctuation,
  not CJK), then the learned pieces in the order they were learned. Writes `vocab.txt` and `tokenizer_config.json`
  under `out_dir` and returns the `vocab.txt` path.

  Deterministic: `tokenizers`' trainer numbers continuation characters in hash-map order, which decides ties between
  equally frequent merges; fixing the alphabet and the `##` characters up front (as pre-registered tokens) makes the
  merge order, hence the vocabulary, a function of the input alone.
  """
  if vocab_size <= len(SPECIAL_TOKENS):
    raise ValueError(f'vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}')
  if isinstance(files, str):
    files = [files]
  alphabet = _training_alphabet(files, do_lower_case, limit_alphabet)
  continuations = [CONTINUATION_PREFIX + ch for ch in alphabet if not (_is_punctuation(ch) or _is_cjk(ch))]
  fixed = len(SPECIAL_TOKENS) + len(alphabet) + len(continuations)
  if fixed >= vocab_size:
    raise ValueError(f'vocab_size={vocab_size} leaves no room for learned pieces: the special tokens, the '
                     f'{len(alphabet)}-character alphabet and its ## forms take {fixed} ids; '
                     'lower limit_alphabet or raise vocab_size')
  tokenizer = _bert_pipeline({UNK: 0}, do_lower_case)
  tokenizer.model = models.WordPiece(unk_token=UNK, max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD)
  trainer = trainers.WordPieceTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS) + continuations,
      initial_alphabet=alphabet, limit_alphabet=len(alphabet), continuing_subword_prefix=CONTINUATION_PREFIX,
      show_progress=False)
  tokenizer.train_from_iterator(_batched(_training_lines(files)), trainer=trainer)
  vocab = tokenizer.get_vocab()
  trained = sorted(vocab, key=vocab.get)
  fixed_tokens = set(SPECIAL_TOKENS) | set(alphabet) | set(continuations)
  tokens = list(SPECIAL_TOKENS) + alphabet + continuations + [t for t in trained if t not in fixed_tokens]
  if len(set(tokens)) != len(tokens) or set(tokens) != set(trained):
    raise RuntimeError(f'unexpected trained vocabulary: {trained[:8]}...')
  vocab_file = write_vocab(tokens, storage.join(out_dir, VOCAB_FILE))
  return load_tokenizer(vocab_file, do_lower_case).save(out_dir)
