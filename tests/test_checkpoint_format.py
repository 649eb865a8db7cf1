"""The arrays of a checkpoint's state are written uncompressed (`checkpoint.make_manager`), and a step written
compressed (orbax's default zstd, as earlier versions of this project wrote them) still restores, verified, into
the same values. The codec is read back from the stored array's own metadata (tensorstore)."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from common import checkpoint, checksums


def _stored_codec(workdir, step: int, key: str):
  spec = {'driver': 'zarr', 'path': key,
          'kvstore': {'driver': 'ocdbt', 'base': f'file://{checkpoint.checkpoint_dir(workdir)}/{step}/state'}}
  return ts.open(spec).result().spec().to_json()['metadata'].get('compressor')


def test_arrays_are_uncompressed_and_compressed_steps_still_restore(tmp_path):
  rng = np.random.default_rng(0)
  state = {'params': {'w': jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
                      'b': jnp.asarray(rng.standard_normal(8), jnp.float32)},
           'step': jnp.asarray(5, jnp.int32)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  workdir = str(tmp_path)
  earlier = ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(create=True),
                                  item_handlers={'state': ocp.StandardCheckpointHandler(),
                                                 'meta': ocp.JsonCheckpointHandler()})
  earlier.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(
      {'step': 5, 'checksums': checksums.state_checksums(state)})))
  earlier.wait_until_finished()
  earlier.close()
  assert _stored_codec(workdir, 5, 'params.w') == {'id': 'zstd', 'level': 1}

  manager = checkpoint.make_manager(workdir, async_save=False)
  restored, _, step = checkpoint.restore(manager, abstract, workdir=workdir)
  assert step == 5
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(got, want)

  checkpoint.save(manager, 6, state, {'step': 6})
  manager.wait_until_finished()
  assert _stored_codec(workdir, 6, 'params.w') is None
  restored, _, step = checkpoint.restore(manager, abstract, workdir=workdir)
  manager.close()
  assert step == 6
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(got, want)
