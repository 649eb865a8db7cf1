"""The two sides of a comparison: our REAL train step (`common.trainer`) compiled ahead of time, and a PyTorch
training step (an HF model, `torch.optim.AdamW`, gradient clipping) on the same batch."""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from common import recipe as recipe_lib
from common import sharding, trainer


@contextlib.contextmanager
def jax_settings(settings: dict | None):
  """`jax.config` options (e.g. {'jax_default_prng_impl': 'rbg'}) set for the duration of the block."""
  old = {name: getattr(jax.config, name) for name in (settings or {})}
  for name, value in (settings or {}).items():
    jax.config.update(name, value)
  try:
    yield
  finally:
    for name, value in old.items():
      jax.config.update(name, value)


@dataclasses.dataclass
class JaxStep:
  """Our train step: the executable that is timed is the one whose FLOPs and memory are reported."""
  name: str
  compiled: Any                 # jax.stages.Compiled of `trainer.make_train_step`
  state: trainer.TrainState     # donated to and returned by every call (unless built with donate=False)
  batch: dict                   # the global batch (jax arrays on the mesh)
  objective: trainer.Objective
  setup: trainer.Setup
  compile_s: float
  metrics: Any = None
  first_metrics: dict | None = None   # metrics of the first step from the initial state, when it ran alone

  def run(self, steps: int) -> None:
    for _ in range(steps):  # as in the trainer: each step gets the previous step's `state_finite`
      checked = trainer.UNCHECKED if self.metrics is None else self.metrics['state_finite']
      self.state, self.metrics = self.compiled(self.state, self.batch, checked)
    jax.block_until_ready((self.state, self.metrics))
    if self.first_metrics is None and steps:
      self.first_metrics = {k: float(v) for k, v in jax.device_get(self.metrics).items()} if steps == 1 else {}

  def hlo(self) -> str:
    return self.compiled.as_text()

  def flops_xla(self) -> float:
    """XLA's `cost_analysis()` FLOPs of the compiled step (matmuls and elementwise work)."""
    cost = self.compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    return float((cost or {}).get('flops', float('nan')))

  def memory(self) -> dict:
    """`memory_analysis()` bytes plus `peak_bytes`: arguments + outputs not aliased to an argument + temporaries
    (the CPU client's own `peak_memory_in_bytes` counts the arguments only)."""
    m = self.compiled.memory_analysis()
    if m is None:
      return {}
    keys = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes', 'temp_size_in_bytes')
    out = {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}
    out['peak_bytes'] = max(int(getattr(m, 'peak_memory_in_bytes', 0) or 0),
                            out.get('argument_size_in_bytes', 0) + out.get('output_size_in_bytes', 0)
                            - out.get('alias_size_in_bytes', 0) + out.get('temp_size_in_bytes', 0))
    return out

  def state_bytes(self) -> int:
    """Parameters + optimizer state + carried state (e.g. XLNet's memory)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.state)))


def pretraining_recipe(model_name: str, config: ml_collections.ConfigDict) -> recipe_lib.Recipe:
  """The model's recipe, after checking `config` and completing it in place as the pretraining runner does
  (`common.pretrain.validate_config` for one device, then the recipe's `finalize_config`). A bad config raises
  `common.config.ConfigError` naming the field."""
  from common import pretrain  # pylint: disable=import-outside-toplevel
  recipe = recipe_lib.get(model_name)
  pretrain.validate_config(recipe, config, 1)
  recipe.finalize_config(config)
  return recipe


def build_jax_step(config: ml_collections.ConfigDict, objective: trainer.Objective, host_batch: dict, *,
                   name: str = 'ours', compiler_options: dict | None = None, settings: dict | None = None,
                   donate: bool = True) -> JaxStep:
  """State and step as `trainer.train` builds them, on the first device only: `trainer.build_setup`, then the
  jitted step of `trainer.compile_train_step` (or, with `donate=False`, `trainer.make_train_step` jitted the same
  way without donation), lowered and compiled with `compiler_options` (XLA debug options). `settings` are
  `jax.config` options active while state and step are traced."""
  with jax_settings(settings):
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    setup = trainer.build_setup(config, objective, mesh)
    state = setup.create_state()
    batch = sharding.host_batch_to_global(host_batch, setup.mesh)
    if donate:
      _, jitted = trainer.compile_train_step(setup, objective, config)
    else:
      step_fn = trainer.make_train_step(objective, setup.tx, setup.schedule, config.grad_accum_steps)
      jitted = jax.jit(step_fn, in_shardings=(setup.state_shardings, None, NamedSharding(setup.mesh, P())),
                       out_shardings=(setup.state_shardings, NamedSharding(setup.mesh, P())))
    started = time.perf_counter()
    lowered = trainer.lower_train_step(jitted, setup, batch)
    compiled = lowered.compile(compiler_options)
    compile_s = time.perf_counter() - started
  return JaxStep(name, compiled, state, batch, objective, setup, compile_s)


# ----------------------------------------------------------------------------------------------------------------
# PyTorch.
# ----------------------------------------------------------------------------------------------------------------

def torch_long(x) -> Any:
  """A numpy array as an int64 torch tensor."""
  import torch  # pylint: disable=import-outside-toplevel
  return torch.from_numpy(np.asarray(x, np.int64))


def torch_adamw(model, optim_cfg: ml_collections.ConfigDict, no_decay: Callable[[str], bool], fused: bool = False):
  """`torch.optim.AdamW` with our optimizer section's hyper-parameters; parameters whose name `no_decay` accepts
  (LayerNorm, biases: the decay mask ours uses) get no weight decay. `fused`: torch's fused kernel (CUDA)."""
  import torch  # pylint: disable=import-outside-toplevel
  named = list(model.named_parameters())
  groups = [{'params': [p for n, p in named if not no_decay(n)], 'weight_decay': optim_cfg.weight_decay},
            {'params': [p for n, p in named if no_decay(n)], 'weight_decay': 0.0}]
  return torch.optim.AdamW(groups, lr=optim_cfg.learning_rate, betas=(optim_cfg.b1, optim_cfg.b2),
                           eps=optim_cfg.eps, **({'fused': True} if fused else {}))


@dataclasses.dataclass
class TorchStep:
  """One PyTorch training step: `loss = loss_of(model, call_index)`, backward, `clip_grad_norm_`, optimizer step.

  `loss_of` runs the model's forward on the benchmark batch (it may cycle through several input sets by the call
  index and carry state between calls, as XLNet's memory)."""
  model: Any
  optimizer: Any
  loss_of: Callable[[Any, int], Any]
  clip_grad_norm: float
  calls: int = 0

  def step(self):
    import torch  # pylint: disable=import-outside-toplevel
    loss = self.loss_of(self.model, self.calls)
    self.calls += 1
    loss.backward()
    if self.clip_grad_norm > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return loss

  def run(self, steps: int) -> None:
    for _ in range(steps):
      self.step()

  def counted_flops(self) -> float:
    """FLOPs of one step (this call runs it) as torch's `FlopCounterMode` counts them (matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
    counter = FlopCounterMode(display=False)
    with counter:
      self.step()
    return float(counter.get_total_flops())

  def state_bytes(self) -> int:
    """Parameters + optimizer state."""
    import torch  # pylint: disable=import-outside-toplevel
    return sum(p.numel() * p.element_size() for p in self.model.parameters()) + sum(
        t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
        if torch.is_tensor(t))

  def attn_implementation(self) -> str:
    return getattr(self.model.config, '_attn_implementation', None) or 'default'


def hf_training_step(make_model: Callable[[], Any], optim_cfg: ml_collections.ConfigDict,
                     loss_of: Callable[[Any, int], Any], *, no_decay: Callable[[str], bool],
                     threads: int, device: str = 'cpu', autocast: Any = None) -> TorchStep:
  """`make_model()` (an HF PyTorch model, built after `torch.manual_seed(0)`; float32 weights, train mode: dropout
  on) trained as ours is: AdamW with the same hyper-parameters and decay mask, clipping at
  `optim_cfg.clip_grad_norm`, `torch.set_num_threads(threads)`. `device`: where the model lives ('cuda': fused
  AdamW); `autocast`: a torch dtype the forward runs in under `torch.autocast` (None: float32)."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = make_model().float().train().to(device)
  if autocast is not None:
    forward = loss_of

    def loss_of(model, call):  # pylint: disable=function-redefined
      with torch.autocast(device.split(':')[0], dtype=autocast):
        return forward(model, call)
  return TorchStep(model, torch_adamw(model, optim_cfg, no_decay, fused=device.startswith('cuda')), loss_of,
                   optim_cfg.clip_grad_norm)
