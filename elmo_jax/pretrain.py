"""ELMo biLM pretraining: corpus -> word vocabulary -> sentence shards -> sharded training -> checkpoints.

  python -m elmo_jax.pretrain --config elmo_jax/configs/tiny.py --workdir runs/elmo_tiny
  python -m elmo_jax.pretrain --config elmo_jax/configs/original.py --workdir DIR --dry_run --target=tpu:v4-32
"""
from common import pretrain
from elmo_jax.recipe import RECIPE

if __name__ == '__main__':
  pretrain.main(RECIPE)
