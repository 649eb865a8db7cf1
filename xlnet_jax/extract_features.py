"""XLNet feature extraction: the content-stream hidden states of chosen layers for every token of every input line.

  python -m xlnet_jax.extract_features --init HF_DIR_or_WORKDIR --input_file lines.txt --output_file out.jsonl \
      --layers=-1,-2,-3,-4 [--format jsonl|npz] [--max_seq_length 128] [--batch_size 8]

One example a line: a sentence, or a pair `A ||| B` laid out `A <sep> B <sep> <cls>` (padded on the left, as XLNet's
fine-tuning). The model runs without memory, permutation or query stream: full bidirectional attention over the
real tokens. `--init`: an HF XLNet directory or a pretraining workdir, loaded as fine-tuning loads it
(`xlnet_jax.tasks.load_init`, the directory's `spiece.model`). Layer -1 is the output of the last layer (before
the final dropout, which is the identity here). Output layouts and bad-line handling: `common/extract.py`.
"""
from __future__ import annotations

from common import extract
from xlnet_jax.tasks import load_encoder

__all__ = ['load_encoder']

if __name__ == '__main__':
  extract.run_main('XLNet', load_encoder)
