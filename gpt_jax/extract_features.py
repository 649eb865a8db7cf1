"""GPT feature extraction: the hidden states of chosen layers for every token of every input line.

  python -m gpt_jax.extract_features --init HF_DIR_or_WORKDIR --input_file lines.txt --output_file out.jsonl \
      --layers=-1,-2 [--format jsonl|npz] [--max_seq_length 128] [--batch_size 8]

One example a line: a sentence, or a pair `A ||| B` laid out `<start> A <delim> B <extract>` (the fine-tuning
layout; the task tokens are appended to the vocabulary with fixed rows, `gpt_jax.tasks.load_init`). Layer -1 is
the output of the last block. Output layouts and bad-line handling: `common/extract.py`.
"""
from __future__ import annotations

from common import extract
from gpt_jax.tasks import load_encoder

__all__ = ['load_encoder']

if __name__ == '__main__':
  extract.run_main('GPT', load_encoder)
