"""BERT feature extraction: the hidden states of chosen layers for every token of every input line.

  python -m bert_jax.extract_features --init HF_DIR_or_WORKDIR --input_file lines.txt --output_file out.jsonl \
      --layers=-1,-2,-3,-4 [--format jsonl|npz] [--max_seq_length 128] [--batch_size 8]

One example a line: a sentence, or a pair `A ||| B` laid out `[CLS] A [SEP] B [SEP]`. `--init`: an HF BERT directory
or a pretraining workdir, loaded as fine-tuning loads it (`bert_jax.tasks.load_init`, the directory's
`vocab.txt`). Layer -1 is the output of the last encoder layer. Output layouts and bad-line handling:
`common/extract.py`.
"""
from __future__ import annotations

from bert_jax.tasks import load_encoder
from common import extract

__all__ = ['load_encoder']

if __name__ == '__main__':
  extract.run_main('BERT', load_encoder)
