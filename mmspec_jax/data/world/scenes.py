"""Scenes of the synthetic world: 1-4 coloured shapes on a 3x3 grid, and their pictures.

A scene is a background ('dark' or 'light') and one to four shapes, each with a kind, a colour, a
size and a grid cell (row 0 = top, col 0 = left); no two shapes share a cell. Shapes are kept in
reading order (by row, then column) so that a scene has one canonical form: equal scenes compare
equal, hash equal and serialize to the same JSON.

Pictures are drawn without anti-aliasing, so every pixel of a shape has exactly its colour, and
sizes are chosen for a ViT with 8-pixel patches at 64x64: a cell is ~21 px, a large shape spans
~19 px, a small one ~12 px.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

KINDS = ('circle', 'square', 'triangle', 'star', 'diamond')
# Saturated, mutually distant RGB values; none is close to either background.
COLOURS = {
    'red': (220, 30, 30),
    'green': (30, 170, 50),
    'blue': (40, 80, 235),
    'yellow': (245, 215, 20),
    'purple': (150, 40, 200),
    'orange': (250, 130, 10),
    'white': (250, 250, 250),
}
SIZES = ('small', 'large')
BACKGROUNDS = {'dark': (25, 25, 35), 'light': (175, 175, 170)}
GRID = 3
MAX_SHAPES = 4
ROW_NAMES = ('top', 'middle', 'bottom')
COL_NAMES = ('left', 'center', 'right')
# Radius as a fraction of the cell side: large shapes nearly fill a cell, small ones about 60%.
_RADIUS = {'small': 0.29, 'large': 0.45}


def cell_name(row: int, col: int) -> str:
  """Canonical name of a grid cell: 'top left', 'top center', ..., 'center', 'bottom right'."""
  if (row, col) == (1, 1):
    return 'center'
  return f'{ROW_NAMES[row]} {COL_NAMES[col]}'


@dataclasses.dataclass(frozen=True, order=True)
class Shape:
  """One shape. Fields order (row, col) first so that sorting gives reading order."""
  row: int
  col: int
  kind: str
  colour: str
  size: str

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'unknown shape kind {self.kind!r}; expected one of {KINDS}')
    if self.colour not in COLOURS:
      raise ValueError(f'unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}')
    if self.size not in SIZES:
      raise ValueError(f'unknown size {self.size!r}; expected one of {SIZES}')
    if not (0 <= self.row < GRID and 0 <= self.col < GRID):
      raise ValueError(f'cell ({self.row}, {self.col}) is outside the {GRID}x{GRID} grid')

  @property
  def cell(self) -> str:
    return cell_name(self.row, self.col)

  @property
  def pair(self) -> tuple[str, str]:
    """(colour, kind): what captions name and what scoring counts."""
    return self.colour, self.kind


@dataclasses.dataclass(frozen=True)
class Scene:
  """A background and 1-4 shapes in distinct cells, in reading order."""
  background: str
  shapes: tuple[Shape, ...]

  def __post_init__(self):
    if self.background not in BACKGROUNDS:
      raise ValueError(f'unknown background {self.background!r}; expected one of '
                       f'{tuple(BACKGROUNDS)}')
    if not 1 <= len(self.shapes) <= MAX_SHAPES:
      raise ValueError(f'a scene has 1 to {MAX_SHAPES} shapes, got {len(self.shapes)}')
    cells = [(s.row, s.col) for s in self.shapes]
    if len(set(cells)) != len(cells):
      raise ValueError(f'two shapes share a cell: {cells}')
    if list(self.shapes) != sorted(self.shapes):
      raise ValueError('shapes must be in reading order (sorted by row, then column)')

  @classmethod
  def create(cls, background: str, shapes: Sequence[Shape]) -> Scene:
    """A scene from shapes in any order."""
    return cls(background, tuple(sorted(shapes)))

  def to_json(self) -> dict[str, Any]:
    """A JSON-ready dict: {'background', 'shapes': [{'kind', 'colour', 'size', 'row', 'col'}]}."""
    return {'background': self.background,
            'shapes': [{'kind': s.kind, 'colour': s.colour, 'size': s.size, 'row': s.row,
                        'col': s.col} for s in self.shapes]}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> Scene:
    """Inverse of to_json (also accepts shapes out of reading order)."""
    try:
      shapes = [Shape(row=int(s['row']), col=int(s['col']), kind=s['kind'], colour=s['colour'],
                      size=s['size']) for s in data['shapes']]
      return cls.create(data['background'], shapes)
    except (KeyError, TypeError) as e:
      raise ValueError(f'not a scene: {data!r} ({e!r}); expected {{"background", "shapes": '
                       '[{"kind", "colour", "size", "row", "col"}, ...]}') from e


def sample_scene(rng: np.random.Generator) -> Scene:
  """A uniformly random scene: 1-4 shapes, kinds/colours/sizes independent, distinct cells."""
  num_shapes = int(rng.integers(1, MAX_SHAPES + 1))
  cells = rng.choice(GRID * GRID, size=num_shapes, replace=False)
  shapes = []
  for cell in cells:
    shapes.append(Shape(row=int(cell) // GRID, col=int(cell) % GRID,
                        kind=KINDS[int(rng.integers(len(KINDS)))],
                        colour=tuple(COLOURS)[int(rng.integers(len(COLOURS)))],
                        size=SIZES[int(rng.integers(len(SIZES)))]))
  background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
  return Scene.create(background, shapes)


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
  """Vertices of a polygonal kind centred at (cx, cy) with outer radius r (y grows downward)."""
  if kind == 'square':
    h = 0.8 * r  # A square of half-side r would look far heavier than the circle of radius r.
    return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
  if kind == 'diamond':
    w = 0.7 * r  # Narrower than tall, so it is not just a rotated square.
    return [(cx, cy - r), (cx + w, cy), (cx, cy + r), (cx - w, cy)]
  if kind == 'triangle':  # Pointing up, its centroid-ish on the cell centre.
    return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
  if kind == 'star':  # Five points, inner radius 0.45 r: deep notches that survive 64 px.
    points = []
    for i in range(10):
      radius = r if i % 2 == 0 else 0.45 * r
      angle = -math.pi / 2 + i * math.pi / 5
      points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points
  raise ValueError(f'no polygon for kind {kind!r}')


def shape_center(shape: Shape, size: int) -> tuple[int, int]:
  """Pixel (x, y) of the centre of a shape's cell in a size x size picture; the shape covers it."""
  cell = size / GRID
  return int((shape.col + 0.5) * cell), int((shape.row + 0.5) * cell)


def render(scene: Scene, size: int = 64) -> Image.Image:
  """The scene as an RGB PIL image of size x size pixels (no anti-aliasing).

  Args:
    scene: what to draw.
    size: side in pixels (>= 24, so that a small shape still covers several pixels).
  Returns:
    PIL.Image in mode 'RGB'; deterministic: the same scene always gives the same pixels.
  """
  if size < 24:
    raise ValueError(f'image size must be at least 24 pixels, got {size}')
  image = Image.new('RGB', (size, size), BACKGROUNDS[scene.background])
  draw = ImageDraw.Draw(image)
  cell = size / GRID
  for shape in scene.shapes:
    cx, cy = (shape.col + 0.5) * cell, (shape.row + 0.5) * cell
    r = _RADIUS[shape.size] * cell
    fill = COLOURS[shape.colour]
    if shape.kind == 'circle':
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
      draw.polygon(_polygon(shape.kind, cx, cy, r), fill=fill)
  return image
