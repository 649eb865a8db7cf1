"""`learnable`: a generated binary classification task whose label says whether a given word occurs in the
sentence, made from the embedded corpus (a task a working fine-tuner must learn; no files, no download).
"""
from __future__ import annotations

import functools
import os

import numpy as np

from common.tasks import examples as ex
from common.tasks import registry

COUNTS = {'train': 2000, 'dev': 400}  # Generated when num_train/eval_examples is 0.


@functools.lru_cache(maxsize=4)
def _learnable_sentences(cache_dir: str, word: str, min_words: int, max_words: int) -> tuple[str, ...]:
  from common.data import corpus  # pylint: disable=import-outside-toplevel
  corpus.build_embedded_corpus(cache_dir)
  seen, sentences = set(), []
  for document in corpus.iter_documents(os.path.join(cache_dir, 'train.txt')):
    for sentence in document:
      if min_words <= len(sentence.split()) <= max_words and word.lower() not in sentence.lower() \
          and sentence not in seen:
        seen.add(sentence)
        sentences.append(sentence)
  if not sentences:
    raise ValueError(f'the embedded corpus has no sentence of {min_words}-{max_words} words without {word!r}')
  return tuple(sentences)


def make_learnable_task(num_examples: int, seed: int, word: str = 'pineapple', *, cache_dir: str | None = None,
                        min_words: int = 4, max_words: int = 24) -> list[ex.PairExample]:
  """A binary classification set: label 1 when `word` occurs in `text_a`, else 0.

  Sentences of `min_words`-`max_words` words come from the embedded corpus (built once under `cache_dir`, default
  `corpus.default_cache_dir()/embedded_corpus`); none contains `word`. Exactly `num_examples // 2` examples are
  positive (`word` inserted at a random word position), the rest negative (the sentence unchanged), in random order.
  Deterministic in (`num_examples`, `seed`, `word`); sentences repeat only when `num_examples` exceeds the pool.
  Short sentences keep `word` inside any `max_seq_length` >= 64.
  """
  if num_examples <= 0:
    raise ValueError(f'num_examples must be positive, got {num_examples}')
  if not word or word.split() != [word]:
    raise ValueError(f'word must be one word without spaces, got {word!r}')
  from common.data import corpus  # pylint: disable=import-outside-toplevel
  cache_dir = cache_dir or os.path.join(corpus.default_cache_dir(), 'embedded_corpus')
  sentences = _learnable_sentences(os.path.abspath(cache_dir), word, min_words, max_words)
  rng = np.random.default_rng(seed)
  labels = np.zeros(num_examples, dtype=np.int64)
  labels[:num_examples // 2] = 1
  rng.shuffle(labels)
  picks = rng.choice(len(sentences), size=num_examples, replace=num_examples > len(sentences))
  examples = []
  for i, (label, pick) in enumerate(zip(labels, picks)):
    words = sentences[pick].split()
    if label:
      words.insert(int(rng.integers(0, len(words) + 1)), word)
    examples.append(ex.PairExample(guid=f'learnable-{seed}-{i}', text_a=' '.join(words), text_b=None, label=int(label)))
  return examples


def generate(split: str, limit: int, config) -> list[ex.PairExample]:
  """`limit` examples of `split` (0: `COUNTS`), seed 0 for train and 1 otherwise, sentences of at most
  `config.learnable_max_words` words."""
  return make_learnable_task(limit or COUNTS.get(split, 400), seed=0 if split == 'train' else 1,
                             max_words=config.learnable_max_words)


registry.register(registry.TaskInfo('learnable', 'classification', ('0', '1'), ('train', 'dev'), spelling='learnable',
                                    generate=generate, tfds_missing='it is generated'))
