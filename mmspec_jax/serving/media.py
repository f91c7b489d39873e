"""Images in requests: `data:` URLs (base64 PNG, JPEG or WebP), `file://` paths under an allowed
folder when the server was started with one; nothing is fetched from the network."""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse

from PIL import Image

ALLOWED_FORMATS = ('PNG', 'JPEG', 'WEBP')
# Larger images are refused before they are decoded (the model sees 336 x 336 pixels anyway).
MAX_PIXELS = 4096 * 4096


def load_image(url: str, allowed_local_media_path: str = '') -> Image.Image:
  """The RGB image an `image_url` names; ValueError (naming what is wrong) otherwise."""
  if url.startswith('data:'):
    header, _, payload = url.partition(',')
    if not header.endswith(';base64') or not payload:
      raise ValueError('an image data URL must be "data:image/...;base64,<data>"')
    try:
      data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
      raise ValueError(f'the image data URL is not valid base64 ({e})') from e
    return _decode(io.BytesIO(data), 'the image data URL')
  scheme = urllib.parse.urlparse(url).scheme
  if scheme == 'file':
    if not allowed_local_media_path:
      raise ValueError('file:// image URLs are off: start the server with '
                       '--config.allowed_local_media_path=DIR to allow files under DIR')
    path = os.path.realpath(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    root = os.path.realpath(allowed_local_media_path)
    if os.path.commonpath([path, root]) != root:
      raise ValueError(f'image file {path} is outside the allowed folder {root}')
    if not os.path.isfile(path):
      raise ValueError(f'image file not found: {path}')
    with open(path, 'rb') as f:
      return _decode(io.BytesIO(f.read()), path)
  if scheme in ('http', 'https'):
    raise ValueError('this server fetches nothing from the network: send the image inline as '
                     'a data:image/...;base64 URL')
  raise ValueError(f'unsupported image URL scheme {scheme!r}: use a data: URL')


def _decode(data: io.BytesIO, what: str) -> Image.Image:
  try:
    image = Image.open(data)  # Reads the header only.
    if image.width * image.height > MAX_PIXELS:
      raise ValueError(f'{what}: {image.width} x {image.height} pixels, more than {MAX_PIXELS}')
    image.load()
  except (OSError, Image.UnidentifiedImageError, Image.DecompressionBombError) as e:
    raise ValueError(f'cannot decode {what} as an image ({e})') from e
  if image.format not in ALLOWED_FORMATS:
    raise ValueError(f'{what}: image format {image.format} is not one of {ALLOWED_FORMATS}')
  return image.convert('RGB')
