"""The plug-in layering (README "How to add a model"), checked on the source: nothing in common/ imports a model
package, a model's library modules never import a runner, and every model package offers a recipe the shared
runners can pick by name."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_PACKAGES = sorted(d for d in os.listdir(ROOT) if d.endswith('_jax') and os.path.isdir(os.path.join(ROOT, d)))
RUNNERS = {'common.pretrain', 'common.finetune', 'common.extract'}
ENTRY_POINTS = {'pretrain.py', 'finetune.py', 'extract_features.py', 'export.py', 'generate.py'}


def _imports(path: str) -> set[str]:
  """Every module `path` imports (`import a.b`, `from a import b` as `a` and `a.b`)."""
  names = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def _python_files(package: str):
  for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
    for name in files:
      if name.endswith('.py'):
        yield os.path.join(dirpath, name)


def _is_runner(module: str) -> bool:
  return any(module == r or module.startswith(r + '.') for r in RUNNERS)


def test_common_imports_no_model_package():
  offenders = [(os.path.relpath(path, ROOT), module) for path in _python_files('common') for module in _imports(path)
               if module.split('.')[0] in MODEL_PACKAGES]
  assert not offenders


@pytest.mark.parametrize('package', MODEL_PACKAGES)
def test_model_library_modules_import_no_runner(package):
  offenders = [(os.path.relpath(path, ROOT), module) for path in _python_files(package)
               if os.path.basename(path) not in ENTRY_POINTS for module in _imports(path) if _is_runner(module)]
  assert not offenders


@pytest.mark.parametrize('package', MODEL_PACKAGES)
def test_every_model_has_a_recipe_found_by_name(package):
  from common import recipe  # pylint: disable=import-outside-toplevel
  found = recipe.get(package[:-len('_jax')])
  assert isinstance(found, recipe.Recipe) and found.name == package[:-len('_jax')]


def test_unknown_model_is_a_user_error():
  from common import recipe  # pylint: disable=import-outside-toplevel
  from common.config import UserError  # pylint: disable=import-outside-toplevel
  with pytest.raises(UserError, match="unknown model 'nope'"):
    recipe.get('nope')
