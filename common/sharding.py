"""Device mesh, logical-axis rules and helpers to create and move arrays already sharded.

Axes of the mesh: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state sharded),
`tensor` (Megatron-style model parallel over heads / mlp / vocab). Modules annotate parameters and activations with
logical names (`batch, length, embed, heads, kv, mlp, vocab`); `rules` map those names to mesh axes.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from common.config import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')   # the mesh axes a batch's leading axis is split over

# Logical axis name -> mesh axis (or axes). Parameters: `embed` is FSDP-sharded, `heads`/`mlp`/`vocab` tensor-sharded.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', BATCH_AXES),
    ('length', None),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv', None),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('type_vocab', None),
    ('position', None),
    ('classes', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
)


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1, dcn_data: int = 1,
                num_devices: int = 0) -> ml_collections.ConfigDict:
  """Default mesh section of a config: `-1` means "all remaining devices"; `num_devices` (0 = every attached
  device) runs a single process on its first `num_devices` devices only."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, dcn_data=dcn_data,
                                        num_devices=num_devices))


def mesh_devices(cfg: ml_collections.ConfigDict) -> list[jax.Device]:
  """The devices a run's mesh spans: every attached device, or the first `cfg.num_devices` of one process's."""
  attached = jax.devices()
  count = cfg.get('num_devices', 0)
  if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= len(attached):
    raise ConfigError(f'config.mesh.num_devices: must be 0 (all) or 1..{len(attached)} (the attached devices), '
                      f'got {count!r}')
  if count in (0, len(attached)):
    return list(attached)
  if jax.process_count() > 1:
    raise ConfigError(f'config.mesh.num_devices={count}: a device subset is for one process; with '
                      f'{jax.process_count()} processes the mesh spans all {len(attached)} devices (set 0)')
  return list(attached[:count])


def resolve_mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Returns (data, fsdp, tensor) with one -1 filled in; refuses shapes whose product is not the device count."""
  sizes = [int(cfg.data), int(cfg.fsdp), int(cfg.tensor)]
  if sizes.count(-1) > 1:
    raise ConfigError('config.mesh: at most one of data/fsdp/tensor may be -1')
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f'config.mesh: sizes must be positive or -1, got data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}')
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f'config.mesh: {num_devices} devices are not divisible by fsdp*tensor*... = {known}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f'config.mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices')
  return tuple(sizes)


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh. `cfg.dcn_data > 1` splits `data` across slices / hosts (hybrid mesh)."""
  devices = mesh_devices(cfg) if devices is None else list(devices)
  shape = resolve_mesh_shape(cfg, len(devices))
  dcn = int(cfg.get('dcn_data', 1))
  if dcn > 1:
    if shape[0] % dcn:
      raise ConfigError(f'config.mesh.dcn_data={dcn} must divide the data axis size {shape[0]}')
    ici = (shape[0] // dcn, shape[1], shape[2])
    array = mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1), devices)
  elif len(devices) == 1 or devices[0].platform == 'cpu':
    array = np.asarray(devices, dtype=object).reshape(shape)
  else:
    array = mesh_utils.create_device_mesh(shape, devices)
  return Mesh(array, MESH_AXES)


def rules_from_config(config: ml_collections.ConfigDict | None) -> tuple[tuple[str, Any], ...]:
  """Logical rules: the defaults, with any `config.logical_rules` entries (name -> axis) replacing them."""
  rules = dict(DEFAULT_RULES)
  if config is not None and config.get('logical_rules'):
    for name, axis in dict(config.logical_rules).items():
      rules[name] = tuple(axis) if isinstance(axis, (list, tuple)) else axis
  return tuple(rules.items())


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes from a dimension's sharding (last first) until they divide its size.

  A vocabulary of 30522 cannot be split 4 ways; rather than fail, that dimension is split fewer ways (or replicated).
  """
  fitted = []
  for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = [] if axes is None else ([axes] if isinstance(axes, str) else list(axes))
    while names and shape[i] % math.prod(mesh.shape[a] for a in names):
      names.pop()
    fitted.append(None if not names else names[0] if len(names) == 1 else tuple(names))
  return P(*fitted)


def logical_shardings(boxed_abstract: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of `nn.Partitioned` boxes (e.g. from `jax.eval_shape(model.init, ...)`)."""
  specs = nn.get_partition_spec(boxed_abstract)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  shapes = nn.meta.unbox(boxed_abstract)
  return jax.tree.map(lambda s, x: NamedSharding(mesh, fit_spec(s.spec, x.shape, mesh)), shardings, shapes,
                      is_leaf=lambda x: isinstance(x, NamedSharding))


def _path_key(path) -> tuple:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def match_shardings(tree: Any, reference: Any, reference_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for `tree` (e.g. an optimizer state) copied from `reference` (params) by tree-path suffix.

  A leaf of `tree` whose path ends with the full path of a reference leaf of the same shape gets that leaf's
  sharding (Adam's mu/nu, accumulated gradients); everything else (counters, scalars) is replicated.
  """
  ref_leaves = jax.tree_util.tree_flatten_with_path(reference)[0]
  ref_shards = jax.tree_util.tree_leaves(reference_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  by_path = {_path_key(p): (np.shape(leaf), s) for (p, leaf), s in zip(ref_leaves, ref_shards)}
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    key = _path_key(path)
    for start in range(len(key)):
      hit = by_path.get(key[start:])
      if hit is not None and hit[0] == np.shape(leaf):
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_spec(ndim: int) -> P:
  """The PartitionSpec of a batch-leading array of rank `ndim`: its leading axis split over `BATCH_AXES`
  (data, fsdp), the other `ndim - 1` axes replicated."""
  return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch arrays are split over (data, fsdp) on their leading axis, replicated on the rest (`batch_spec`)."""
  return NamedSharding(mesh, batch_spec(ndim))


def host_batch_to_global(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from each process's rows (`jax.make_array_from_process_local_data`)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in host_batch.items()}
