"""Sentences and lines of plain text, the same for every corpus source.

Sentence splitting (`split_sentences`) is deliberately simple and deterministic: paragraphs are separated by blank
lines; inside a paragraph, lines are joined and a sentence ends at `.`, `?` or `!` (plus closing quotes/brackets)
followed by whitespace and a capital letter (optionally behind an opening quote or bracket), unless the word before
the stop is a known abbreviation (`e.g.`, `i.e.`, `etc.`, ...) or a single capital initial.

`split_long_line` cuts a line too long to be a sentence; `is_control_only` spots a line that is no text.
"""
from __future__ import annotations

import re
import unicodedata

# A candidate boundary: terminal punctuation, optional closing quotes/brackets, whitespace, then (looking ahead) a
# capital letter, optionally preceded by an opening quote or bracket.
_SENTENCE_BOUNDARY = re.compile(r'([.?!]["\')\]]*)\s+(?=["\'(\[]?[A-Z])')

# Words that end with a period without ending a sentence (compared lower-cased, without the final period).
_ABBREVIATIONS = frozenset({
    'e.g', 'i.e', 'etc', 'vs', 'cf', 'al', 'approx', 'resp', 'incl', 'esp', 'fig', 'no', 'nos', 'vol', 'ch', 'sec',
    'mr', 'mrs', 'ms', 'dr', 'prof', 'st', 'jr', 'sr', 'inc', 'ltd', 'co', 'corp', 'ca', 'viz', 'a.k.a', 'u.s',
})


def normalize_whitespace(text: str) -> str:
  """Collapses every run of whitespace (including line/paragraph separators) to one space; drops Cc controls."""
  text = ' '.join(text.split())
  if not text.isprintable():
    text = ''.join(ch for ch in text if unicodedata.category(ch) != 'Cc')
  return text


def split_paragraph(paragraph: str) -> list[str]:
  """Splits one paragraph (any whitespace allowed inside) into sentences; see the module docstring for the rule."""
  paragraph = normalize_whitespace(paragraph)
  sentences, start = [], 0
  for match in _SENTENCE_BOUNDARY.finditer(paragraph):
    before = paragraph[start:match.start(1)].rsplit(' ', 1)[-1].lstrip('"\'([')
    if before.lower() in _ABBREVIATIONS or (len(before) == 1 and before.isupper()):
      continue
    sentences.append(paragraph[start:match.end(1)])
    start = match.end()
  sentences.append(paragraph[start:])
  return [s for s in sentences if s]


def split_sentences(text: str, *, line_breaks_are_paragraphs: bool = False) -> list[str]:
  """Splits `text` into sentences: paragraphs at blank lines (or at every line break), then `split_paragraph`."""
  if line_breaks_are_paragraphs:
    paragraphs = text.splitlines()
  else:
    paragraphs = re.split(r'\n[ \t\r\f\v]*\n', text.replace('\r\n', '\n'))
  return [sentence for paragraph in paragraphs for sentence in split_paragraph(paragraph)]


def is_control_only(text: str) -> bool:
  """True when every character is whitespace or a Unicode control/format/unassigned character (category C*)."""
  return all(ch.isspace() or unicodedata.category(ch)[0] == 'C' for ch in text)


def split_long_line(text: str, max_chars: int) -> list[str]:
  """A line longer than `max_chars` as sentences (`split_paragraph`), each piece still longer cut at the last space
  before `max_chars` (or at `max_chars` inside a word longer than that). Nothing is dropped but whitespace."""
  if len(text) <= max_chars:
    return [text]
  pieces = []
  for sentence in split_paragraph(text):
    while len(sentence) > max_chars:
      cut = sentence.rfind(' ', 0, max_chars + 1)
      if cut <= 0:
        cut = max_chars
      pieces.append(sentence[:cut].strip())
      sentence = sentence[cut:].strip()
    if sentence:
      pieces.append(sentence)
  return [p for p in pieces if p]
