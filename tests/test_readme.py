"""The README matches the tree: every module is in its layout, every algorithm in its
lists, and its `make_round` example runs."""

import pathlib
import re

import jax
import numpy as np
import optax
from flax import nnx
from support import digits

from isr_jax.data import pack_clients
from isr_jax.fl.registry import ALGORITHMS
from isr_jax.models import create_model
from isr_jax.objective import init_params, make_problem, split_model
from isr_jax.taps import make_isr_spec

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
  start = README.index(f"## {title}\n")
  end = README.find("\n## ", start + 1)
  return README[start:end if end > 0 else None]


def test_layout_names_every_module():
  layout = section("Layout")
  names = set(re.findall(r"[\w/]+", layout))
  missing = []
  for folder in ("isr_jax", "experiments", "benchmarks"):
    for path in sorted((ROOT / folder).rglob("*.py")):
      rel = path.relative_to(ROOT / folder)
      # One module per algorithm: the folder is listed, the registry test covers the rest.
      if path.name == "__init__.py" or rel.parts[:2] == ("fl", "algorithms"):
        continue
      if rel.parts[0] in ("configs", "sweeps", "sections"):  # listed as folders
        continue
      if path.stem not in names and f"{path.stem}.py" not in layout:
        missing.append(str(path.relative_to(ROOT)))
  assert not missing, f"README ## Layout does not list {missing}"


def test_every_algorithm_is_in_the_readme():
  named = set(re.findall(r"`(\w+)`", README))
  assert not sorted(set(ALGORITHMS) - named)


def test_make_round_example_runs():
  block = section("Using the library (e.g. in Colab)")
  code = re.search(r"A round of your own.*?```python\n(.*?)```", block, re.S).group(1)
  code = "\n".join(line[2:] for line in code.splitlines())  # the list item's indent
  train, _, info = digits()
  net = create_model("lenet5", num_classes=10, input_shape=info.input_shape, rngs=nnx.Rngs(0))
  graphdef, model_params = split_model(net)
  spec = make_isr_spec(net.tap_names, enabled=True, num_taps=2)
  params = init_params(graphdef, model_params, spec, num_classes=10,
                       input_shape=info.input_shape, key=jax.random.PRNGKey(1))
  clients = pack_clients(train.x, train.y, np.array_split(np.arange(400), 20), 16)
  namespace = dict(jax=jax, optax=optax, problem=make_problem(graphdef, spec), params=params,
                   clients=jax.tree.map(jax.numpy.asarray, clients), num_rounds=2)
  exec(code, namespace)  # noqa: S102 - the README's own example
  assert int(namespace["state"].round) == 2
  assert float(namespace["metrics"]["server/eta_g"]) >= 1.0
