"""XLNet feature extraction: the content-stream hidden states of chosen layers for every token of every input line.

  python -m xlnet_jax.extract_features --init HF_DIR_or_WORKDIR --input_file lines.txt --output_file out.jsonl \
      --layers=-1,-2,-3,-4 [--format jsonl|npz] [--max_seq_length 128] [--batch_size 8]

One example a line: a sentence, or a pair `A ||| B` laid out `A <sep> B <sep> <cls>` (padded on the left, as XLNet's
fine-tuning). The model runs without memory, permutation or query stream: full bidirectional attention over the
real tokens. `--init`: an HF XLNet directory or a pretraining workdir, loaded as fine-tuning loads it
(`xlnet_jax.finetune.load_init`, the directory's `spiece.model`). Layer -1 is the output of the last layer (before
the final dropout, which is the identity here). Output layouts and bad-line handling: `common/extract.py`.
"""
from __future__ import annotations


from common import extract
from common import run as run_lib
from xlnet_jax import finetune as xlnet_finetune
from xlnet_jax import finetune_data
from xlnet_jax import model as xlnet_model


def load_encoder(init: str) -> extract.Encoder:
  """The encoder of an HF XLNet directory or a pretraining workdir, with its tokenizer."""
  model_cfg, params, tokenizer = xlnet_finetune.load_init(init)
  model = xlnet_model.XLNetModel(model_cfg)

  def layer_outputs(encoder_params, input_ids, segment_ids, input_mask):
    return extract.capture_layer_outputs(model, xlnet_model.XLNetLayer, encoder_params, input_ids, segment_ids,
                                         input_mask, deterministic=True, select=lambda out: out[0])

  return extract.Encoder(tokenizer=tokenizer, params=params, num_layers=int(model_cfg.n_layer),
                         convert=finetune_data.convert_pair_examples, layer_outputs=layer_outputs)


def main(argv):
  del argv
  extract.main(load_encoder)


if __name__ == '__main__':
  extract.define_flags('XLNet')
  run_lib.app_run(main)
