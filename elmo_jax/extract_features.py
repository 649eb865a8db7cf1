"""ELMo feature extraction: the biLM layers of every word of every input line.

  python -m elmo_jax.extract_features --init BILM_DIR_or_WORKDIR --input_file lines.txt --output_file out.jsonl \
      [--layers=0,1,2] [--format jsonl|npz] [--max_seq_length 128] [--batch_size 8]

`--init`: a biLM directory (`options.json` + `weights.hdf5`) or a pretraining workdir. Layer 0 is the token layer
(the character-CNN vector twice), layers 1.. the LSTM layers (forward ‖ backward), -1 the top one; the default is
all of them. Words are split as in pretraining (`elmo_jax.tokenizer.split_words`) and read through their
characters; a pair `A ||| B` is one sentence of A's words then B's. `<S>` and `</S>` are not written. Output
layouts and bad-line handling: `common/extract.py`.
"""
from __future__ import annotations

from common import extract
from common import run as run_lib
from elmo_jax import features, tokenizer


def extract_file(bilm: features.BiLM, input_file: str, output_file: str, *, layers: str = '', fmt: str | None = None,
                 max_seq_length: int = 128, batch_size: int = 8) -> extract.ExtractStats:
  """Writes the `layers` of every usable line of `input_file` to `output_file`; returns the line counts."""
  indices = extract.parse_layers(layers or ','.join(map(str, range(bilm.num_layers))), bilm.num_layers)
  fmt = extract.output_format(output_file, fmt)
  stats = extract.ExtractStats()
  sentences = ((index, tokenizer.split_words(example.text_a) + tokenizer.split_words(example.text_b or ''))
               for index, example in extract.read_examples(input_file, stats))
  writer = extract.JsonlWriter(output_file) if fmt == 'jsonl' else extract.NpzWriter(output_file, indices)
  try:
    for index, words, layer_features in features.iter_features(bilm, sentences, max_seq_length=max_seq_length,
                                                               batch_size=batch_size):
      writer.write(index, words, {k: layer_features[k] for k in indices})
      stats.examples += 1
  finally:
    writer.close()
  print(f'{input_file}: {stats.examples} of {stats.lines} lines extracted to {output_file} ({fmt}); '
        f'{stats.bad_lines} bad lines skipped', flush=True)
  return stats


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  values = flags.FLAGS
  extract_file(features.load_bilm(values.init), values.input_file, values.output_file, layers=values.layers,
               fmt=values.format, max_seq_length=values.max_seq_length, batch_size=values.batch_size)


if __name__ == '__main__':
  extract.define_flags('ELMo biLM')
  run_lib.app_run(main)
