"""The evaluation's outputs: results.json, results.md (markdown tables) and tau_vs_gamma.png.

results.json: {"complete": bool, "settings": {...}, "cells": [...]} (cells as in run.py; the
target-alone cells, draft "target" and gamma 0, carry the answer quality).
results.md: tau per gamma and MBSU at gammas 3 and 5, one row per task x draft x sampling; tau,
tokens verified, draft calls per step and MBSU of each tree or adaptive shape; then the target's
answer quality per task.
tau_vs_gamma.png: one panel per task, one line per draft x sampling, the gamma + 1 ceiling dashed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from mmspec_jax.decoding import runner

JSON_FILE = 'results.json'
MARKDOWN_FILE = 'results.md'
PLOT_FILE = 'tau_vs_gamma.png'
MBSU_GAMMAS = (3, 5)  # The paper's headline gammas.
_LINE_STYLES = {'greedy': '-', 'sample': ':'}

Cell = dict[str, Any]


def prepare_out_dir(out_dir: str):
  """Creates out_dir before anything runs, so a bad path fails at once."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f'out_dir {out_dir!r} is a file; give a directory')
  os.makedirs(out_dir, exist_ok=True)


def _drafted(cells: Sequence[Cell]) -> list[Cell]:
  """The chain cells (trees and adaptive lengths have a `shape`)."""
  return [c for c in cells if c['gamma'] > 0 and not c.get('shape')]


def _shaped(settings: dict[str, Any], cells: Sequence[Cell]) -> list[str]:
  """The trees and adaptive lengths table, or nothing when none ran."""
  shapes = settings.get('shapes') or []
  cells = [c for c in cells if c.get('shape')]
  if not shapes or not cells:
    return []
  by_key = {(c['task'], c['draft'], c['sampling'], c['shape']): c for c in cells}
  lines = ['## Trees and adaptive draft lengths', '',
           'Each cell: tau / tokens verified per step (n) / draft calls per step (k) / MBSU = '
           'tau / (c k + 1).', '',
           '| task | draft | sampling | ' + ' | '.join(shapes) + ' |',
           '|' + '---|' * (3 + len(shapes))]
  for task, draft, sampling in _unique((c['task'], c['draft'], c['sampling']) for c in cells):
    values = []
    for shape in shapes:
      c = by_key.get((task, draft, sampling, shape))
      values.append('' if c is None else (
          f'{c["block_efficiency"]:.2f} / {c["verified_tokens"]} / '
          f'{c["draft_calls_per_step"]:.2f} / '
          + (f'{c["mbsu"]:.2f}' if c['mbsu'] is not None else '-')))
    lines.append(f'| {task} | {draft} | {sampling} | ' + ' | '.join(values) + ' |')
  return lines + ['']


def _unique(values) -> list:
  return list(dict.fromkeys(values))  # In first-seen order.


def mbsu_gammas(gammas: Sequence[int]) -> list[int]:
  """The MBSU columns: gammas 3 and 5 when run, else the largest gamma."""
  chosen = [g for g in MBSU_GAMMAS if g in gammas]
  return chosen or ([max(gammas)] if gammas else [])


def markdown(settings: dict[str, Any], cells: Sequence[Cell]) -> str:
  """Both tables, with the draft/target cost ratios c that MBSU uses."""
  gammas = settings['gammas']
  by_key = {(c['task'], c['draft'], c['sampling'], c['gamma']): c for c in _drafted(cells)}
  lines = []
  if settings['drafts']:
    ratios = ', '.join(
        name + ('' if name == info['kind'] else f' ({info["kind"]})')
        + f' {info["parameters"] / settings["target_parameters"]:.4f}'
        for name, info in settings['drafts'].items())
    lines += ['## Block efficiency tau and memory-bound speedup (MBSU)', '',
              f'c = draft / target parameters: {ratios}', '']
    columns = ([f'tau g={g}' for g in gammas] + [f'MBSU g={g}' for g in mbsu_gammas(gammas)])
    lines += ['| task | draft | sampling | ' + ' | '.join(columns) + ' |',
              '|' + '---|' * (3 + len(columns))]
    for task, draft, sampling in _unique((c['task'], c['draft'], c['sampling'])
                                         for c in _drafted(cells)):
      row = [by_key.get((task, draft, sampling, g)) for g in gammas]
      values = [f'{c["block_efficiency"]:.2f}' if c else '' for c in row]
      values += [f'{c["mbsu"]:.2f}' if c and c['mbsu'] is not None else ''
                 for c in (by_key.get((task, draft, sampling, g)) for g in mbsu_gammas(gammas))]
      lines.append(f'| {task} | {draft} | {sampling} | ' + ' | '.join(values) + ' |')
    lines.append('')
    lines += _shaped(settings, cells)
  lines += ['## Target answer quality (greedy, no draft)', '',
            '| task | examples | quality | target tokens/s |', '|---|---|---|---|']
  for cell in cells:
    if cell['gamma'] == 0:
      speed = cell['tokens_per_second']
      lines.append(f'| {cell["task"]} | {cell["num_rows"]} | {cell["quality"]:.3f} | '
                   + (f'{speed:.1f}' if speed else '') + ' |')
  return '\n'.join(lines) + '\n'


def plot(settings: dict[str, Any], cells: Sequence[Cell], path: str):
  """tau against gamma, one panel per task, one line per draft x sampling; gamma + 1 dashed."""
  import matplotlib  # Deferred: only the report needs it, and without a display.
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  tasks, gammas = settings['tasks'], settings['gammas']
  drafts = list(settings['drafts'])
  colors = {name: f'C{i}' for i, name in enumerate(drafts)}
  figure, panels = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False,
                                sharey=True)
  for task, ax in zip(tasks, panels[0]):
    ax.plot(gammas, [g + 1 for g in gammas], 'k--', linewidth=1, label='gamma + 1 (ceiling)')
    for draft in drafts:
      for sampling in settings['samplings']:
        points = sorted((c['gamma'], c['block_efficiency']) for c in _drafted(cells)
                        if (c['task'], c['draft'], c['sampling']) == (task, draft, sampling))
        if points:
          ax.plot(*zip(*points), _LINE_STYLES.get(sampling, '-'), marker='o',
                  color=colors[draft], label=f'{draft}, {sampling}')
    ax.set_title(task)
    ax.set_xlabel('gamma (draft tokens per step)')
    ax.set_xticks(gammas)
    ax.set_ylim(bottom=0.9)  # tau >= 1: the target's own token.
    ax.grid(alpha=0.3)
  panels[0][0].set_ylabel('tau (block efficiency)')
  panels[0][0].legend(fontsize='small')
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def write_json(out_dir: str, settings: dict[str, Any], cells: Sequence[Cell], *, complete: bool):
  # pylint: disable=protected-access
  with runner.atomic_writer(os.path.join(out_dir, JSON_FILE)) as f:
    json.dump({'complete': complete, 'settings': settings, 'cells': list(cells)}, f, indent=2,
              ensure_ascii=False)


def write_outputs(out_dir: str, settings: dict[str, Any], cells: Sequence[Cell]):
  """All three files; results.json is marked complete last."""
  # pylint: disable=protected-access
  with runner.atomic_writer(os.path.join(out_dir, MARKDOWN_FILE)) as f:
    f.write(markdown(settings, cells))
  plot(settings, cells, os.path.join(out_dir, PLOT_FILE))
  write_json(out_dir, settings, cells, complete=True)
