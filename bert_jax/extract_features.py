"""BERT feature extraction: the hidden states of chosen layers for every token of every input line.

  python -m bert_jax.extract_features --init HF_DIR_or_WORKDIR --input_file lines.txt --output_file out.jsonl \
      --layers=-1,-2,-3,-4 [--format jsonl|npz] [--max_seq_length 128] [--batch_size 8]

One example a line: a sentence, or a pair `A ||| B` laid out `[CLS] A [SEP] B [SEP]`. `--init`: an HF BERT directory
or a pretraining workdir, loaded as fine-tuning loads it (`bert_jax.finetune.load_init`, the directory's
`vocab.txt`). Layer -1 is the output of the last encoder layer. Output layouts and bad-line handling:
`common/extract.py`.
"""
from __future__ import annotations


from bert_jax import finetune as bert_finetune
from bert_jax import finetune_data
from bert_jax import model as bert_model
from common import extract
from common import run as run_lib


def load_encoder(init: str) -> extract.Encoder:
  """The encoder of an HF BERT directory or a pretraining workdir, with its tokenizer."""
  model_cfg, params, tokenizer = bert_finetune.load_init(init)
  model = bert_model.BertModel(model_cfg)

  def layer_outputs(encoder_params, input_ids, segment_ids, input_mask):
    return extract.capture_layer_outputs(model, bert_model.BertLayer, encoder_params, input_ids, segment_ids,
                                         input_mask, deterministic=True)

  return extract.Encoder(tokenizer=tokenizer, params=params, num_layers=int(model_cfg.num_hidden_layers),
                         convert=finetune_data.convert_pair_examples, layer_outputs=layer_outputs)


def main(argv):
  del argv
  extract.main(load_encoder)


if __name__ == '__main__':
  extract.define_flags('BERT')
  run_lib.app_run(main)
