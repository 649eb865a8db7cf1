"""XLNet's sentencepiece tokenization: a trainer with XLNet's special symbols and the original text handling.

Special symbols, with the ids of the released XLNet `spiece.model` (the trainer reproduces them):

  0 <unk>   1 <s>   2 </s>   3 <cls>   4 <sep>   5 <pad>   6 <mask>   7 <eod>   8 <eop>

`<unk>`, `<s>`, `</s>` are sentencepiece's own; `<cls> <sep> <pad> <mask> <eod>` are *control* symbols (never produced
from text); `<eop>` and the punctuation `. ( ) " - – £ €` are *user-defined* symbols (always cut out of the text as
pieces of their own, ids 8-16), exactly as the original training command declares them.

Encoding follows the original XLNet preprocessing, in this order:

1. `preprocess_text`: strip and collapse every whitespace run to one space; replace the LaTeX quotes "``" and "''"
   by '"'; unless `keep_accents`, decompose with NFKD and drop combining characters (accents are removed whether or
   not the text is lower-cased, as in the original); with `do_lower_case`, lower-case.
2. sentencepiece segmentation (its own `nmt_nfkc` normalisation, whitespace as '▁').
3. The original's digit-comma rule (`encode_pieces`): a piece of two or more characters that ends in a digit followed
   by ',' (e.g. '0,') is re-encoded without its ',' (and without a '▁' it did not have), and the ',' is appended as a
   piece of its own, so numbers such as "2000," never glue the comma to the last digit.

Parity: in `transformers` 5.x `XLNetTokenizer` is the Rust (`tokenizers` Unigram) class; there is no sentencepiece
class any more. Built from this model's pieces, scores and normalisation map it yields our ids exactly except for
step 3, which it does not implement. (Its `from_pretrained` on a bare `spiece.model` turns the user-defined symbols
into added tokens that cut the text before normalisation, which changes the segmentation around them; the tests
document both.)

`is_word_start` marks the pieces that begin a word for whole-word span masking: pieces starting with '▁', the
special/control/unknown/user-defined symbols, and pieces made only of punctuation (as the original `_is_start_piece`).
`space_id` is the id of the bare '▁' piece (sentencepiece emits it before a piece that cannot carry the '▁', as in
'▁' '(' 'language'); the data pipeline glues it to the piece that follows.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import unicodedata
from typing import Iterable, Sequence

import numpy as np

from common import storage

SPIECE_UNDERLINE = '\u2581'
MODEL_FILE = 'spiece.model'
CONFIG_FILE = 'tokenizer_config.json'

# name -> (piece, id in the released XLNet model).
SPECIAL_SYMBOLS = (('unk', '<unk>', 0), ('bos', '<s>', 1), ('eos', '</s>', 2), ('cls', '<cls>', 3),
                   ('sep', '<sep>', 4), ('pad', '<pad>', 5), ('mask', '<mask>', 6), ('eod', '<eod>', 7),
                   ('eop', '<eop>', 8))
CONTROL_SYMBOLS = ('<cls>', '<sep>', '<pad>', '<mask>', '<eod>')
USER_DEFINED_SYMBOLS = ('<eop>', '.', '(', ')', '"', '-', '\u2013', '\u00a3', '\u20ac')

_DIGIT_COMMA = re.compile(r'\d,')  # Cheap pre-check: no digit before a comma, no piece the rule could touch.


# ---------------------------------------------------------------------------------------------------------------------
# Text handling of the original
# ---------------------------------------------------------------------------------------------------------------------

def preprocess_text(text: str, *, lower: bool = False, remove_space: bool = True, keep_accents: bool = False) -> str:
  """The original XLNet text normalisation (step 1 of the module docstring)."""
  if remove_space:
    text = ' '.join(text.strip().split())
  text = text.replace('``', '"').replace("''", '"')
  if not keep_accents:
    text = unicodedata.normalize('NFKD', text)
    text = ''.join(ch for ch in text if not unicodedata.combining(ch))
  if lower:
    text = text.lower()
  return text


def _needs_digit_comma_fix(piece: str) -> bool:
  return len(piece) > 1 and piece[-1] == ',' and piece[-2].isdigit()


def split_digit_comma(sp, pieces: Sequence[str]) -> list[str]:
  """The original's digit-comma rule (step 3) applied to the pieces of one text; `sp` re-encodes the number."""
  out = []
  for piece in pieces:
    if not _needs_digit_comma_fix(piece):
      out.append(piece)
      continue
    sub = sp.encode(piece[:-1].replace(SPIECE_UNDERLINE, ''), out_type=str)
    if piece[0] != SPIECE_UNDERLINE and sub and sub[0][0] == SPIECE_UNDERLINE:
      sub = sub[1:] if len(sub[0]) == 1 else [sub[0][1:]] + sub[1:]
    out.extend(sub)
    out.append(piece[-1])
  return out


def _is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith('P')


def _user_defined_ids(sp) -> set[int]:
  """Ids of the user-defined pieces, read from the model proto (sentencepiece's API does not expose the type)."""
  try:
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return {i for i, piece in enumerate(proto.pieces) if piece.type == user_defined}
  except Exception:  # No protobuf: user-defined pieces are the ones declared by the trainer that score 0.
    return {i for i in range(sp.get_piece_size())
            if sp.id_to_piece(i) in USER_DEFINED_SYMBOLS and sp.get_score(i) == 0.0}


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------

class SentencePieceTokenizer:
  """XLNet's tokenizer over a sentencepiece model (see the module docstring). Built by `load_tokenizer`.

  Encoding methods add no special symbols. A class because it holds the loaded sentencepiece processor.
  """

  def __init__(self, model_file: str, do_lower_case: bool = False, keep_accents: bool = False):
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    self.model_file = storage.fspath(model_file)
    self.do_lower_case = bool(do_lower_case)
    self.keep_accents = bool(keep_accents)
    self._sp = spm.SentencePieceProcessor(model_proto=storage.read_bytes(self.model_file))
    size = self._sp.get_piece_size()
    self._pieces = [self._sp.id_to_piece(i) for i in range(size)]
    for name, piece, _ in SPECIAL_SYMBOLS:
      i = self._sp.piece_to_id(piece)
      if self._pieces[i] != piece:
        raise ValueError(f'sentencepiece model {self.model_file!r} has no {piece} symbol')
      setattr(self, f'{name}_id', int(i))
    space = self._sp.piece_to_id(SPIECE_UNDERLINE)
    self.space_id = int(space) if self._pieces[space] == SPIECE_UNDERLINE else -1
    user_defined = _user_defined_ids(self._sp)
    self._is_word_start = np.array([
        piece.startswith(SPIECE_UNDERLINE) or self._sp.is_control(i) or self._sp.is_unknown(i) or i in user_defined
        or (piece != '' and all(_is_punctuation(ch) for ch in piece))
        for i, piece in enumerate(self._pieces)], dtype=bool)

  # -- encoding ------------------------------------------------------------------------------------------------------

  def preprocess(self, text: str) -> str:
    return preprocess_text(text, lower=self.do_lower_case, keep_accents=self.keep_accents)

  def encode_pieces(self, text: str) -> list[str]:
    """Pieces of `text` (steps 1-3 of the module docstring), e.g. `['▁born', '▁in', '▁200', '0', ',']`."""
    return split_digit_comma(self._sp, self._sp.encode(self.preprocess(text), out_type=str))

  tokenize = encode_pieces

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, no special symbols added."""
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Iterable[str], num_threads: int = -1) -> list[list[int]]:
    """Ids of every text; the same as `encode` on each (sentencepiece's batch encoder, multi-threaded)."""
    texts = [self.preprocess(t) for t in texts]
    if not texts:
      return []
    ids = self._sp.encode(texts, out_type=int, num_threads=num_threads)
    fix = [i for i, t in enumerate(texts) if _DIGIT_COMMA.search(t)]
    if fix:
      for i, pieces in zip(fix, self._sp.encode([texts[i] for i in fix], out_type=str, num_threads=num_threads)):
        if any(_needs_digit_comma_fix(p) for p in pieces):
          ids[i] = [self._sp.piece_to_id(p) for p in split_digit_comma(self._sp, pieces)]
    return ids

  def id_to_piece(self, i: int) -> str:
    return self._pieces[int(i)]

  id_to_token = id_to_piece

  def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
    return [self._pieces[int(i)] for i in ids]

  def piece_to_id(self, piece: str) -> int:
    return int(self._sp.piece_to_id(piece))

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ids (sentencepiece's decoder; control symbols vanish, for display only)."""
    return self._sp.decode([int(i) for i in ids])

  # -- vocabulary facts ----------------------------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    return len(self._pieces)

  @property
  def pieces(self) -> list[str]:
    """Id -> piece (do not modify)."""
    return self._pieces

  @property
  def is_word_start(self) -> np.ndarray:
    """`[vocab_size] bool`: the piece begins a word (see the module docstring); used by whole-word span masking."""
    return self._is_word_start

  @property
  def special_ids(self) -> dict[str, int]:
    """`{'<unk>': 0, ..., '<eop>': 8}`: the ids of the nine special symbols in this model."""
    return {piece: getattr(self, f'{name}_id') for name, piece, _ in SPECIAL_SYMBOLS}

  def save(self, out_dir: str) -> str:
    """Copies the model to `out_dir/spiece.model` and writes a `tokenizer_config.json`; returns the model path."""
    storage.makedirs(out_dir)
    path = storage.join(out_dir, MODEL_FILE)
    if not storage.same_file(path, self.model_file):
      storage.copy_file(self.model_file, path)
    config = dict(tokenizer_class='XLNetTokenizer', do_lower_case=self.do_lower_case, remove_space=True,
                  keep_accents=self.keep_accents, padding_side='left')
    storage.write_text(storage.join(out_dir, CONFIG_FILE), json.dumps(config, indent=2) + '\n')
    return path

  def __repr__(self) -> str:
    return (f'SentencePieceTokenizer(vocab_size={self.vocab_size}, do_lower_case={self.do_lower_case}, '
            f'model_file={self.model_file!r})')


def load_tokenizer(model_file: str, do_lower_case: bool = False, *, keep_accents: bool = False
                   ) -> SentencePieceTokenizer:
  """A `SentencePieceTokenizer` over `model_file` (a `.model` file, or a directory holding `spiece.model`)."""
  if storage.isdir(model_file):
    model_file = storage.join(model_file, MODEL_FILE)
  if not storage.isfile(model_file):
    raise ValueError(f'sentencepiece model {model_file!r} does not exist')
  return SentencePieceTokenizer(model_file, do_lower_case=do_lower_case, keep_accents=keep_accents)


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------

def train_sentencepiece(files: str | Sequence[str], vocab_size: int, out_prefix: str, *, do_lower_case: bool = False,
                        keep_accents: bool = False, model_type: str = 'unigram', character_coverage: float = 1.0,
                        input_sentence_size: int = 10_000_000, seed: int = 0, num_threads: int = 1) -> str:
  """Trains a sentencepiece model with XLNet's symbols on text files in the BERT format; returns `out_prefix.model`.

  Lines are read with `common.data.corpus.iter_documents` (globs, `.gz`; bad lines skipped) and normalised with
  `preprocess_text` (the text the model will see when encoding), then trained with the original's settings:
  `model_type`, `character_coverage`, `--shuffle_input_sentence`, `input_sentence_size`, the control and
  user-defined symbols of the module docstring. Deterministic: the trainer's random generator is seeded with `seed`
  and `num_threads` is fixed (the result depends on the thread count; 1 takes a few seconds on a 1.6 MB corpus).
  `vocab_size` is a soft limit: a corpus too small for it gives a smaller model (read `vocab_size` from the
  tokenizer, never from the config). Writes `out_prefix.model` and `out_prefix.vocab`.
  """
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  from common.data import corpus  # pylint: disable=import-outside-toplevel
  if isinstance(files, (str, os.PathLike)):
    files = [files]
  if vocab_size <= len(SPECIAL_SYMBOLS) + len(USER_DEFINED_SYMBOLS):
    raise ValueError(f'vocab_size={vocab_size} leaves no room next to the special and user-defined symbols')
  out_prefix = storage.fspath(out_prefix)
  if storage.is_remote(out_prefix):
    # The trainer writes local files: train under a local directory named after the destination (a fixed name, as
    # below), then upload the model and its vocabulary next to `out_prefix`.
    digest = hashlib.sha256(out_prefix.encode()).hexdigest()[:16]
    local_prefix = os.path.join(storage.cache_root(), 'staging', digest, storage.basename(out_prefix))
    train_sentencepiece(files, vocab_size, local_prefix, do_lower_case=do_lower_case, keep_accents=keep_accents,
                        model_type=model_type, character_coverage=character_coverage,
                        input_sentence_size=input_sentence_size, seed=seed, num_threads=num_threads)
    for suffix in ('.model', '.vocab'):
      storage.copy_file(local_prefix + suffix, out_prefix + suffix)
    shutil.rmtree(os.path.dirname(local_prefix), ignore_errors=True)
    return out_prefix + '.model'
  out_dir = os.path.dirname(os.path.abspath(out_prefix))
  os.makedirs(out_dir, exist_ok=True)
  text_path = os.fspath(out_prefix) + '.input.txt'  # A fixed name: the model records its input path.
  with open(text_path, 'w', encoding='utf-8') as f:
    lines = 0
    for document in corpus.iter_documents(list(files)):
      for line in document:
        line = preprocess_text(line, lower=do_lower_case, keep_accents=keep_accents)
        if line:
          f.write(line + '\n')
          lines += 1
  try:
    if lines == 0:
      raise ValueError(f'no text to train a sentencepiece model on in {list(files)}')
    spm.set_random_generator_seed(int(seed))
    spm.SentencePieceTrainer.train(
        input=text_path, model_prefix=os.fspath(out_prefix), vocab_size=int(vocab_size), model_type=model_type,
        character_coverage=float(character_coverage), shuffle_input_sentence=True,
        input_sentence_size=int(input_sentence_size), control_symbols=list(CONTROL_SYMBOLS),
        user_defined_symbols=list(USER_DEFINED_SYMBOLS), unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False,
        num_threads=int(num_threads), minloglevel=2)
  finally:
    os.remove(text_path)
  model_path = os.fspath(out_prefix) + '.model'
  tokenizer = load_tokenizer(model_path)
  wrong = {p: i for p, i in tokenizer.special_ids.items() if i != dict((s[1], s[2]) for s in SPECIAL_SYMBOLS)[p]}
  if wrong:
    raise RuntimeError(f'trained model has unexpected special ids {wrong}')
  return model_path
