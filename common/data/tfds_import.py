"""The one way this project imports TensorFlow Datasets (pretraining corpora and fine-tuning tasks alike)."""
from __future__ import annotations


def import_tfds(purpose: str = 'Reading a TFDS dataset'):
  """`tensorflow_datasets`, with TensorFlow kept off the accelerators; a clear error when it is not installed."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f'{purpose} needs TensorFlow Datasets, which is not installed: '
                      "pip install '.[tfds]', or pip install -e '.[tfds]' in a checkout (installs tensorflow-cpu and "
                      'tensorflow-datasets).') from e
  keep_tensorflow_off_accelerators()
  return tfds


def keep_tensorflow_off_accelerators() -> None:
  """TensorFlow only reads records here: hide the GPUs from it so that it reserves no accelerator memory JAX needs.
  A no-op with tensorflow-cpu, and once TensorFlow has set up its devices (then they stay as they are)."""
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.set_visible_devices([], 'GPU')
  except (ImportError, RuntimeError, ValueError):
    pass
