r"""OmniISR Table III: model × dataset × {CL, FL} × {−ISR, +ISR}, several seeds.

Writes ``<workdir>/table3.md`` and ``table3.csv`` — mIoU, mF1, mPre, mRec as
mean ± std over seeds, the CL–FL gap ``D = mIoU_CL − mIoU_FL`` without and
with ISR and its relative reduction (OmniISR paper §4.2.1, RQ4) — and a
qualitative figure per (model, dataset) like the paper's Table V: input,
ground truth, and the FL model's prediction without and with ISR.

  python -m experiments.segmentation_grid --workdir=runs/table3        # synthetic, < 20 min
  python -m experiments.segmentation_grid --workdir=runs/table3_cityscapes \
      --datasets=cityscapes --data_dir=/data/cityscapes --image_size=256,512 --seeds=0,1,2

Every run is ``experiments/configs/segmentation.py:<model>,<mode>,<dataset>[,isr]``;
the flags below override its rounds, image size, data directory and FL algorithm.
"""

from __future__ import annotations

import logging as std_logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments.common_flags import SEEDS, WORKDIR
from experiments.configs.segmentation import DATASETS, MODELS, get_config
from experiments.reporting import (
  divergence_note,
  fmt,
  mean_std,
  one_line_stops,
  train_unless_diverged,
  write_csv,
)
from isr_jax.analysis import cl_fl_gap, relative_gap_reduction
from isr_jax.plotting import plot_segmentation_examples

_MODELS = flags.DEFINE_list("models", list(MODELS), "Model families.")
_DATASETS = flags.DEFINE_list("datasets", ["synthetic_streets"], "Datasets.")
_FIGURE_EXAMPLES = flags.DEFINE_integer("figure_examples", 4,
                                        "Test images in each qualitative figure.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Root of a real dataset's files.")
_IMAGE_SIZE = flags.DEFINE_list("image_size", None, "H,W to resize to (default: the config's).")
_CL_ROUNDS = flags.DEFINE_integer("cl_rounds", None, "CL epochs (default: the config's).")
_FL_ROUNDS = flags.DEFINE_integer("fl_rounds", None, "FL rounds (default: the config's).")
_ALGORITHM = flags.DEFINE_string("algorithm", None, "FL algorithm (default: fedavg).")
_LOCAL = flags.DEFINE_bool("local", False, "A smoke run of seconds per cell (the configs' "
                           "'local' variant: 2 rounds on 96 images).")

METRICS = ("mIoU", "mF1", "mPre", "mRec")


def run_config(model: str, mode: str, dataset: str, isr: bool, seed: int):
  """The config of one grid cell, with the command-line overrides applied."""
  config = get_config(f"{model},{mode},{dataset}" + (",isr" if isr else "")
                      + (",local" if _LOCAL.value else ""))
  config.seed = seed
  if _DATA_DIR.value:
    config.dataset.data_dir = _DATA_DIR.value
  if _IMAGE_SIZE.value:
    config.dataset.image_size = tuple(int(v) for v in _IMAGE_SIZE.value)
  rounds = _CL_ROUNDS.value if mode == "cl" else _FL_ROUNDS.value
  if rounds:
    config.num_rounds = rounds
    config.eval_every = rounds
  if _ALGORITHM.value:
    config.fl.algorithm = _ALGORITHM.value
  return config


def predict(experiment, params, images):
  logits, _ = jax.jit(experiment.apply)(params["model"], jnp.asarray(images))
  return np.asarray(jnp.argmax(logits, -1))


def run_grid(workdir, models, datasets, seeds, examples):
  results = {}
  for dataset in datasets:
    for model in models:
      figure_models = {}
      for mode in ("cl", "fl"):
        for isr in (False, True):
          for seed in seeds:
            config = run_config(model, mode, dataset, isr, seed)
            name = f"{dataset}_{model}_{mode}_{'isr' if isr else 'base'}_seed{seed}"
            t0 = time.perf_counter()
            out = train_unless_diverged(config, os.path.join(workdir, name), f"{name:52s}")
            if out is None:
              results.setdefault((dataset, model, mode, isr), []).append(None)
              continue
            m = out["metrics"]
            results.setdefault((dataset, model, mode, isr), []).append(m)
            print(f"  {name:52s} mIoU {m['test/mIoU']:.4f} ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
            if mode == "fl" and isr not in figure_models:
              figure_models[isr] = (out["experiment"], out["state"].params, seed)
      if len(figure_models) < 2:
        print(f"  no qualitative figure for {model} on {dataset}: an FL run diverged")
        continue
      exp, _, figure_seed = figure_models[False]
      test = exp.test_data
      images = np.asarray(test.x[0]).reshape((-1,) + test.x.shape[3:])[:examples]
      labels = np.asarray(test.y[0]).reshape((-1,) + test.y.shape[3:])[:examples]
      preds = {f"FL {'+' if isr else '−'} ISR": predict(e, p, images)
               for isr, (e, p, _) in sorted(figure_models.items())}
      plot_segmentation_examples(
          images, labels, preds, os.path.join(workdir, f"qualitative_{dataset}_{model}.png"),
          num_classes=exp.info.num_classes, class_names=exp.info.class_names,
          ignore_index=exp.info.ignore_index, title=f"{model} on {dataset} (seed {figure_seed})")
  return results


def tables(results, seeds) -> tuple[str, list[dict]]:
  rows, lines = [], [
      "| dataset | model | setting | ISR | " + " | ".join(METRICS) + " |",
      "|---|---|---|---|" + "---|" * len(METRICS)]
  gaps = ["", "| dataset | model | D without ISR | D with ISR | relative reduction |",
          "|---|---|---|---|---|"]
  keys = list(dict.fromkeys((d, m) for d, m, _, _ in results))
  for dataset, model in keys:
    means = {}
    for mode in ("cl", "fl"):
      for isr in (False, True):
        all_runs = results[(dataset, model, mode, isr)]
        runs = [r for r in all_runs if r is not None]
        row = {"dataset": dataset, "model": model, "setting": mode.upper(), "isr": isr,
               "seeds": len(runs), "diverged": len(all_runs) - len(runs)}
        cells = []
        for metric in METRICS:
          mean, std = mean_std([100 * r[f"test/{metric}"] for r in runs])
          row[metric], row[f"{metric}_std"] = mean, std
          cells.append(fmt(mean, std, 2))
        cells[-1] += divergence_note(row)
        means[(mode, isr)] = row["mIoU"]
        rows.append(row)
        lines.append(f"| {dataset} | {model} | {mode.upper()} | {'✓' if isr else '✗'} | "
                     + " | ".join(cells) + " |")
    d_off = cl_fl_gap(means[("cl", False)], means[("fl", False)])
    d_on = cl_fl_gap(means[("cl", True)], means[("fl", True)])
    red = relative_gap_reduction(d_off, d_on)
    red_txt = "n/a" if math.isnan(red) else f"{100 * red:+.1f} %"
    gaps.append(f"| {dataset} | {model} | {d_off:.2f} | {d_on:.2f} | {red_txt} |")
  text = ("Metrics in %, mean ± std over seeds " + ", ".join(map(str, seeds)) + ".\n\n"
          + "\n".join(lines) + "\n" + "\n".join(gaps)
          + "\n\nD = mIoU_CL − mIoU_FL; relative reduction = (D_without − D_with) / D_without.\n")
  return text, rows


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("isr_jax").setLevel(std_logging.WARNING)
  for name in _MODELS.value:
    if name not in MODELS:
      raise app.UsageError(f"--models: {name!r} is not one of {list(MODELS)}")
  for name in _DATASETS.value:
    if name not in DATASETS:
      raise app.UsageError(f"--datasets: {name!r} is not one of {list(DATASETS)}")
  workdir = WORKDIR.value or "runs/table3"
  os.makedirs(workdir, exist_ok=True)
  seeds = [int(s) for s in (SEEDS.value or ["0", "1"])]
  t0 = time.perf_counter()
  with one_line_stops():
    results = run_grid(workdir, _MODELS.value, _DATASETS.value, seeds, _FIGURE_EXAMPLES.value)
  text, rows = tables(results, seeds)
  with open(os.path.join(workdir, "table3.md"), "w") as f:
    f.write(text)
  write_csv(rows, os.path.join(workdir, "table3.csv"))
  print("\n" + text)
  print(f"written: {workdir}/table3.md, table3.csv, qualitative_*.png "
        f"({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
  app.run(main)
