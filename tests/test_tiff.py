"""The patch decoder: same pixels as Pillow on every layout, clear errors otherwise."""

import io

import numpy as np
from PIL import Image
import pytest

from pcam_tfdata.convert import synthetic
from pcam_tfdata.convert import tiff
from conftest import REAL_PATCHES

try:  # Writes layouts Pillow cannot; only the tests of those layouts need it.
  import tifffile  # pylint: disable=g-import-not-at-top
except ImportError:
  tifffile = None
needs_tifffile = pytest.mark.skipif(tifffile is None, reason='tifffile is not installed')


def _layouts(names):
  """Parameters for layout names, the tifffile-written ones marked as needing it."""
  return [pytest.param(n, marks=needs_tifffile) if n.startswith('tifffile') else n
          for n in names]


def _patch(seed=0):
  return synthetic.make_patch(np.random.default_rng(seed), 1)


def _pillow(buf):
  with Image.open(io.BytesIO(buf)) as image:
    return np.asarray(image)


def _tifffile_bytes(array, **kwargs):
  out = io.BytesIO()
  tifffile.imwrite(out, array, **kwargs)
  return out.getvalue()


def _planar_bytes(array, **kwargs):
  """RRR..GGG..BBB.. layout: tifffile takes the planes first."""
  return _tifffile_bytes(array.transpose(2, 0, 1), planarconfig='separate', photometric='rgb',
                         **kwargs)


def _tifffile_read(buf):
  pixels = tifffile.imread(io.BytesIO(buf))
  return pixels.transpose(1, 2, 0) if pixels.shape[0] == 3 else pixels


def _pillow_bytes(array, **kwargs):
  out = io.BytesIO()
  Image.fromarray(array).save(out, **kwargs)
  return out.getvalue()


@pytest.mark.skipif(not REAL_PATCHES.is_dir(), reason='../shared/fixtures is not beside this clone')
@pytest.mark.parametrize('name', sorted(p.name for p in REAL_PATCHES.glob('*.*')
                                        if p.suffix in ('.tif', '.png')) if REAL_PATCHES.is_dir() else [])
def test_real_patches_decode_as_pillow(name):
  buf = (REAL_PATCHES / name).read_bytes()
  pixels = tiff.decode(buf, name)
  assert pixels.shape == (96, 96, 3) and pixels.dtype == np.uint8
  np.testing.assert_array_equal(pixels, _pillow(buf))


@pytest.mark.skipif(not REAL_PATCHES.is_dir(), reason='../shared/fixtures is not beside this clone')
def test_uncompressed_real_layouts_take_the_fast_path():
  for name in ('kaggle_original_5c88a5241f0998613f51a43d24085cadf81266f3.tif',
               'tifffile_written_img1.tif', 'strip_before_ifd_1.tif'):
    assert tiff._fast_decode((REAL_PATCHES / name).read_bytes()) is not None, name


@pytest.mark.skipif(not REAL_PATCHES.is_dir(), reason='../shared/fixtures is not beside this clone')
def test_synthetic_tiffs_are_written_like_kaggle():
  original = (REAL_PATCHES / 'kaggle_original_5c88a5241f0998613f51a43d24085cadf81266f3.tif')
  buf = original.read_bytes()
  out = io.BytesIO()
  synthetic.write_tiff(out, tiff.decode(buf))
  assert out.getvalue() == buf


LAYOUTS = {
    'pillow_default': lambda a: _pillow_bytes(a, format='TIFF'),
    'pillow_lzw': lambda a: _pillow_bytes(a, format='TIFF', compression='tiff_lzw'),
    'pillow_deflate': lambda a: _pillow_bytes(a, format='TIFF', compression='tiff_adobe_deflate'),
    'pillow_packbits': lambda a: _pillow_bytes(a, format='TIFF', compression='packbits'),
    'pillow_png': lambda a: _pillow_bytes(a, format='PNG'),
    'tifffile_contiguous': lambda a: _tifffile_bytes(a),
    'tifffile_big_endian': lambda a: _tifffile_bytes(a, byteorder='>'),
    'tifffile_strips_of_7_rows': lambda a: _tifffile_bytes(a, rowsperstrip=7),
    'tifffile_strips_big_endian': lambda a: _tifffile_bytes(a, rowsperstrip=10, byteorder='>'),
    'tifffile_planar': lambda a: _planar_bytes(a),
    'tifffile_planar_deflate': lambda a: _planar_bytes(a, compression='zlib'),
    'tifffile_planar_strips': lambda a: _planar_bytes(a, rowsperstrip=10, byteorder='>'),
    'tifffile_tiled': lambda a: _tifffile_bytes(a, tile=(32, 32)),
    'tifffile_deflate_predictor': lambda a: _tifffile_bytes(a, compression='zlib',
                                                            predictor=True),
    'tifffile_deflate': lambda a: _tifffile_bytes(a, compression='zlib'),
    'tifffile_bigtiff': lambda a: _tifffile_bytes(a, bigtiff=True),
    'tifffile_with_description': lambda a: _tifffile_bytes(a, description='x' * 300,
                                                           metadata=None),
}


@pytest.mark.parametrize('layout', _layouts(sorted(LAYOUTS)))
def test_lossless_layouts_give_source_pixels_and_match_pillow(layout):
  array = _patch(7)
  buf = LAYOUTS[layout](array)
  pixels = tiff.decode(buf, layout)
  np.testing.assert_array_equal(pixels, array)
  np.testing.assert_array_equal(pixels, _tifffile_read(buf) if 'tifffile' in layout else array)
  np.testing.assert_array_equal(pixels, _pillow(buf))


def test_jpeg_compressed_tiff_matches_pillow():
  buf = _pillow_bytes(_patch(), format='TIFF', compression='jpeg')
  np.testing.assert_array_equal(tiff.decode(buf, 'jpeg.tif'), _pillow(buf))


@pytest.mark.parametrize('make, message', [
    (lambda: b'', 'empty file'),
    (lambda: b'id,label\nabc,1\n', 'not an image'),
    (lambda: _pillow_bytes(_patch(), format='TIFF')[:5000], 'truncated'),
    (lambda: _pillow_bytes(_patch(), format='TIFF')[:100], ''),
    (lambda: _pillow_bytes(_patch()[..., 0], format='TIFF'), 'L pixels'),
    (lambda: _pillow_bytes(np.dstack([_patch(), _patch()[..., :1]]), format='TIFF'),
     'RGBA pixels'),
    (lambda: _pillow_bytes(np.dstack([_patch(), _patch()[..., :1]]), format='PNG'),
     'RGBA pixels'),
    pytest.param(lambda: _tifffile_bytes(_patch().astype(np.uint16) * 257, photometric='rgb'),
                 '16/16/16-bit', marks=needs_tifffile),
    (lambda: _pillow_bytes(_patch()[..., 0], format='PNG'), 'L pixels'),
    (lambda: _pillow_bytes(_patch(), format='GIF'), 'P pixels'),
], ids=['empty', 'csv', 'truncated_strip', 'truncated_header', 'gray_tiff', 'rgba_tiff',
        'rgba_png', 'rgb16_tiff', 'gray_png', 'palette_gif'])
def test_bad_images_raise_naming_the_file(make, message):
  with pytest.raises(tiff.BadImageError, match=f'^bad.tif: .*{message}'):
    tiff.decode(make(), 'bad.tif')


def test_16_bit_png_is_refused():
  out = io.BytesIO()
  Image.fromarray((_patch()[..., 0].astype(np.uint16) * 257)).save(out, format='PNG')
  with pytest.raises(tiff.BadImageError, match='bad.png: '):
    tiff.decode(out.getvalue(), 'bad.png')


def test_read_patch_checks_size(tmp_path):
  path = tmp_path / 'small.tif'
  Image.fromarray(_patch()[:64, :80]).save(path, format='TIFF')
  with pytest.raises(tiff.BadImageError, match=r'small.tif: 80x64 patch, expected 96x96'):
    tiff.read_patch(str(path))


@pytest.mark.parametrize('size', [2, 32, 48, 96])
def test_center_crop_is_the_exact_center(size):
  array = _patch()
  c = (96 - size) // 2
  np.testing.assert_array_equal(tiff.center_crop(array, size), array[c:c + size, c:c + size])
  if size == 32:
    np.testing.assert_array_equal(tiff.center_crop(array, 32), array[32:64, 32:64])


@pytest.mark.parametrize('layout', _layouts([
    'pillow_default', 'tifffile_contiguous', 'tifffile_big_endian', 'tifffile_strips_of_7_rows',
    'tifffile_planar', 'tifffile_planar_strips', 'tifffile_with_description']))
def test_uncompressed_layouts_take_the_fast_path(layout):
  array = _patch(3)
  np.testing.assert_array_equal(tiff._fast_decode(LAYOUTS[layout](array)), array)
