"""ctformat.pack: the pack-quantized bit layout (spec §3, FORMATS.md §3.2).

Oracles: hand-computed words, compressed-tensors 0.20's own pack_to_int32 /
unpack_from_int32 (dense layout), and a plain-Python reference for the padded layout of
compressed-tensors < 0.18.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctformat.pack import pack_to_int32, packed_width, unpack_from_int32

DENSE, PADDED = "dense", "padded"


def _u32(t: torch.Tensor) -> list:
    """int32 words as unsigned Python ints (nested lists for 2-D)."""
    return [[int(w) & 0xFFFFFFFF for w in row] for row in t.tolist()]


def _random_q(shape, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    return torch.randint(lo, hi, shape, dtype=torch.int8, generator=g)


# -- hand-computed layouts -------------------------------------------------------------

def test_pack_gives_documented_words_for_int4_minus8_to_7():
    q = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)
    words = pack_to_int32(q, 4)
    assert words.dtype == torch.int32
    assert _u32(words) == [[0x76543210, 0xFEDCBA98]]
    assert torch.equal(unpack_from_int32(words, 4, (1, 16)), q)


def test_pack_writes_low_nibble_first_for_int4():
    # byte k holds element 2k in bits 0-3 and 2k+1 in bits 4-7 (offset +8)
    q = torch.tensor([[-8, 7, 0, -1, 3, -5, 1, 2]], dtype=torch.int8)
    raw = pack_to_int32(q, 4).view(torch.uint8).tolist()
    assert raw == [[0xF0, 0x78, 0x3B, 0xA9]]


def test_pack_writes_bytes_q_plus_128_for_int8():
    q = torch.tensor([[-128, -1, 0, 1, 127, 5, -7, 64]], dtype=torch.int8)
    words = pack_to_int32(q, 8)
    assert words.shape == (1, 2)
    assert words.view(torch.uint8).tolist() == [[0, 127, 128, 129, 255, 133, 121, 192]]
    assert torch.equal(unpack_from_int32(words, 8, (1, 8)), q)


def test_pack_straddles_words_for_int3_element10_dense():
    # offset-binary codes u = q + 4: u = [0,1,2,3,4,5,6,7,0,1,5]
    q = torch.tensor([[-4, -3, -2, -1, 0, 1, 2, 3, -4, -3, 1]], dtype=torch.int8)
    # element i sits at stream bits [3i, 3i+3). Element 10 (u=0b101) spans bits 30..32:
    # its low two bits (0b01) are bits 30-31 of word 0, its top bit (1) is bit 0 of word 1.
    #          u10lo u9  u8  u7  u6  u5  u4  u3  u2  u1  u0
    word0 = 0b01_001_000_111_110_101_100_011_010_001_000
    assert word0 == 0x48FAC688
    word1 = 0b1
    words = pack_to_int32(q, 3, layout=DENSE)
    assert words.shape == (1, 2)            # ceil(11*3/32) = 2
    assert _u32(words) == [[word0, word1]]
    assert torch.equal(unpack_from_int32(words, 3, (1, 11), layout=DENSE), q)


def test_pack_starts_word1_with_element10_for_int3_padded():
    # padded layout: 10 values per word in bits 0..29; element 10 is alone in word 1
    q = torch.tensor([[-4, -3, -2, -1, 0, 1, 2, 3, -4, -3, 1]], dtype=torch.int8)
    word0 = 0b00_001_000_111_110_101_100_011_010_001_000
    words = pack_to_int32(q, 3, layout=PADDED)
    assert _u32(words) == [[word0, 0b101]]
    assert torch.equal(unpack_from_int32(words, 3, (1, 11), layout=PADDED), q)


def test_pack_zero_point_packs_along_output_dim_when_packed_dim0():
    # zero points [out=8, groups=2] -> [1, 2]: column g holds the 8 rows' codes of group g
    zp = torch.stack([torch.arange(-8, 0), torch.arange(0, 8)], dim=1).to(torch.int8)
    words = pack_to_int32(zp, 4, packed_dim=0)
    assert words.shape == (1, 2)
    assert _u32(words) == [[0x76543210, 0xFEDCBA98]]


# -- compressed-tensors 0.20 as the oracle (dense layout) -----------------------------

SHAPES_2D = [(7, 45), (33, 3), (1, 1), (9, 64)]
SHAPES_3D = [(2, 5, 71), (3, 40, 6)]


def _ct_helpers():
    ct = pytest.importorskip("compressed_tensors")  # noqa: F841
    from compressed_tensors.compressors.pack_quantized import helpers
    return helpers


def _ct_unpack_crashes(bits, shape, packed_dim):
    """CT 0.20's 4-bit fast unpack with packed_dim=0 views a transposed [cols, 1] tensor
    as bytes, which fails when the packed dim fits in one word and there is more than one
    column (RuntimeError: stride(-1) must be 1)."""
    if bits != 4 or packed_dim != 0:
        return False
    return packed_width(shape[-2], 4) == 1 and shape[-1] > 1


@pytest.mark.parametrize("shape", SHAPES_2D + SHAPES_3D, ids=str)
@pytest.mark.parametrize("packed_dim", [0, 1])
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_matches_compressed_tensors_for_every_bit_width(bits, packed_dim, shape):
    helpers = _ct_helpers()
    q = _random_q(shape, bits, seed=bits * 10 + packed_dim)
    ours = pack_to_int32(q, bits, packed_dim=packed_dim)
    theirs = helpers.pack_to_int32(q, bits, packed_dim=packed_dim)
    assert ours.dtype == theirs.dtype == torch.int32
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES_2D + SHAPES_3D + [(5, 3), (2, 8, 4)], ids=str)
@pytest.mark.parametrize("packed_dim", [0, 1])
@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_matches_compressed_tensors_for_every_bit_width(bits, packed_dim, shape):
    helpers = _ct_helpers()
    q = _random_q(shape, bits, seed=bits * 10 + packed_dim + 1)
    words = helpers.pack_to_int32(q, bits, packed_dim=packed_dim)
    ours = unpack_from_int32(words, bits, shape, packed_dim=packed_dim)
    assert ours.dtype == torch.int8
    assert torch.equal(ours, q)                 # always: our unpack inverts CT's pack
    if _ct_unpack_crashes(bits, shape, packed_dim):
        # only CT's own call is skipped here; the round trip above still ran
        return
    theirs = helpers.unpack_from_int32(words, bits, torch.Size(shape), packed_dim=packed_dim)
    assert torch.equal(ours, theirs)


def test_ct_unpack_crashes_when_packed_dim0_fits_one_word():
    """Documents the CT 0.20 crash the oracle tests skip; if CT fixes it, drop the skip."""
    helpers = _ct_helpers()
    zp = _random_q((5, 3), 4)
    words = helpers.pack_to_int32(zp, 4, packed_dim=0)
    assert words.shape == (1, 3)
    with pytest.raises(RuntimeError):
        helpers.unpack_from_int32(words, 4, zp.shape, packed_dim=0)
    assert torch.equal(unpack_from_int32(words, 4, zp.shape, packed_dim=0), zp)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.integers(1, 8), packed_dim=st.integers(0, 1),
       shape=st.one_of(st.tuples(st.integers(1, 12), st.integers(1, 70)),
                       st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 12))),
       seed=st.integers(0, 2**16))
def test_pack_matches_compressed_tensors_for_random_shapes(bits, packed_dim, shape, seed):
    helpers = _ct_helpers()
    q = _random_q(shape, bits, seed)
    assert torch.equal(pack_to_int32(q, bits, packed_dim=packed_dim),
                       helpers.pack_to_int32(q, bits, packed_dim=packed_dim))


# -- padded layout (compressed-tensors < 0.18) against a plain-Python reference --------

def _ref_pack_padded(rows: list[list[int]], bits: int) -> list[list[int]]:
    """32//bits values per word, LSB first, offset-binary, top bits and tail zero."""
    per, off = 32 // bits, 1 << (bits - 1)
    out = []
    for row in rows:
        words = []
        for start in range(0, len(row), per):
            w = 0
            for k, v in enumerate(row[start:start + per]):
                w |= (v + off) << (k * bits)
            words.append(w)
        out.append(words)
    return out


def _ref_unpack_padded(words: list[list[int]], bits: int, n: int) -> list[list[int]]:
    per, off, mask = 32 // bits, 1 << (bits - 1), (1 << bits) - 1
    out = []
    for row in words:
        vals = []
        for w in row:
            for k in range(per):
                vals.append(((w >> (k * bits)) & mask) - off)
        out.append(vals[:n])
    return out


@pytest.mark.parametrize("n", [1, 9, 10, 11, 31, 64, 67])
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_matches_python_reference_for_padded_layout(bits, n):
    q = _random_q((3, n), bits, seed=bits + n)
    words = pack_to_int32(q, bits, layout=PADDED)
    expected = _ref_pack_padded(q.tolist(), bits)
    assert words.shape == (3, -(-n // (32 // bits)))
    assert _u32(words) == expected
    assert unpack_from_int32(words, bits, (3, n), layout=PADDED).tolist() == \
        _ref_unpack_padded(expected, bits, n)


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_unpack_reads_python_reference_words_for_padded_layout(bits):
    q = _random_q((4, 23), bits, seed=bits)
    ref = _ref_pack_padded(q.tolist(), bits)
    words = torch.tensor(ref, dtype=torch.int64).to(torch.int32)   # < 2^30: fits int32
    assert torch.equal(unpack_from_int32(words, bits, (4, 23), layout=PADDED), q)


@pytest.mark.parametrize("packed_dim", [0, 1])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_layouts_identical_when_bits_divide_8(bits, packed_dim):
    q = _random_q((2, 37, 29), bits, seed=bits)
    dense = pack_to_int32(q, bits, packed_dim=packed_dim, layout=DENSE)
    padded = pack_to_int32(q, bits, packed_dim=packed_dim, layout=PADDED)
    assert torch.equal(dense, padded)
    assert packed_width(37, bits, DENSE) == packed_width(37, bits, PADDED)


@pytest.mark.parametrize("bits,dense_w,padded_w", [(3, 384, 410), (5, 640, 683), (6, 768, 820),
                                                   (7, 896, 1024)])
def test_layouts_differ_in_width_when_bits_do_not_divide_8(bits, dense_w, padded_w):
    q = _random_q((2, 4096), bits, seed=bits)
    assert pack_to_int32(q, bits, layout=DENSE).shape == (2, dense_w)
    assert pack_to_int32(q, bits, layout=PADDED).shape == (2, padded_w)
    assert packed_width(4096, bits, DENSE) == dense_w
    assert packed_width(4096, bits, PADDED) == padded_w


# -- round trips ---------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.integers(1, 8), packed_dim=st.integers(0, 1), layout=st.sampled_from([DENSE, PADDED]),
       shape=st.one_of(st.tuples(st.integers(1, 20), st.integers(1, 100)),
                       st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 40))),
       seed=st.integers(0, 2**16))
def test_unpack_inverts_pack_for_random_inputs(bits, packed_dim, layout, shape, seed):
    q = _random_q(shape, bits, seed)
    words = pack_to_int32(q, bits, packed_dim=packed_dim, layout=layout)
    n = shape[-2] if packed_dim == 0 else shape[-1]
    expect = list(shape)
    expect[-2 if packed_dim == 0 else -1] = packed_width(n, bits, layout)
    assert words.shape == tuple(expect)
    back = unpack_from_int32(words, bits, shape, packed_dim=packed_dim, layout=layout)
    assert back.dtype == torch.int8
    assert torch.equal(back, q)


def test_unpack_inverts_pack_when_input_noncontiguous():
    q = _random_q((40, 30), 4).t()                     # [30, 40], transposed strides
    assert torch.equal(unpack_from_int32(pack_to_int32(q, 4), 4, q.shape), q)


# -- padding and input checks ---------------------------------------------------------

@pytest.mark.parametrize("n", [1, 5, 13, 31, 33, 50])
@pytest.mark.parametrize("bits", range(1, 9))
def test_padding_bits_are_zero_for_dense_layout(bits, n):
    q = torch.full((2, n), (1 << (bits - 1)) - 1, dtype=torch.int8)   # every code all ones
    for row in _u32(pack_to_int32(q, bits, layout=DENSE)):
        stream = sum(w << (32 * k) for k, w in enumerate(row))
        assert stream == (1 << (n * bits)) - 1


@pytest.mark.parametrize("n", [1, 5, 13, 33])
@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_padding_bits_are_zero_for_padded_layout(bits, n):
    per = 32 // bits
    q = torch.full((2, n), (1 << (bits - 1)) - 1, dtype=torch.int8)
    for row in _u32(pack_to_int32(q, bits, layout=PADDED)):
        counts = [per] * (n // per) + ([n % per] if n % per else [])
        assert row == [(1 << (c * bits)) - 1 for c in counts]


@pytest.mark.parametrize("packed_dim", [0, 1])
def test_padding_bits_are_zero_for_int4_either_packed_dim(packed_dim):
    q = torch.full((5, 5), 7, dtype=torch.int8)
    w = _u32(pack_to_int32(q, 4, packed_dim=packed_dim))
    assert all(word == 0xFFFFF for row in w for word in row)


@pytest.mark.parametrize("bits,bad", [(4, 8), (4, -9), (1, 1), (3, -5), (7, 64), (2, 2)])
def test_pack_raises_when_value_out_of_range(bits, bad):
    q = torch.zeros((2, 8), dtype=torch.int8)
    q[1, 3] = bad
    with pytest.raises(ValueError):
        pack_to_int32(q, bits)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.uint8, torch.float32, torch.bfloat16])
def test_pack_raises_when_input_not_int8(dtype):
    with pytest.raises(ValueError):
        pack_to_int32(torch.zeros((2, 8), dtype=dtype), 4)


@pytest.mark.parametrize("bits", [0, 9, 16])
def test_pack_raises_when_bits_out_of_range(bits):
    with pytest.raises(ValueError):
        pack_to_int32(torch.zeros((2, 8), dtype=torch.int8), bits)


@pytest.mark.parametrize("layout", [DENSE, PADDED])
@pytest.mark.parametrize("delta", [-1, 1])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_unpack_raises_when_packed_width_wrong(bits, delta, layout):
    shape = (3, 100)
    good = packed_width(100, bits, layout)
    words = torch.zeros((3, good + delta), dtype=torch.int32)
    with pytest.raises(ValueError):
        unpack_from_int32(words, bits, shape, layout=layout)


def test_unpack_raises_when_zero_point_width_wrong_packed_dim0():
    words = torch.zeros((3, 4), dtype=torch.int32)       # [out=32, g=4] at 4 bits needs 4 rows
    with pytest.raises(ValueError):
        unpack_from_int32(words, 4, (32, 4), packed_dim=0)


def test_unpack_raises_when_words_not_int32():
    with pytest.raises(ValueError):
        unpack_from_int32(torch.zeros((2, 1), dtype=torch.int64), 4, (2, 8))


def test_unpack_raises_when_dense_width_read_as_padded():
    # in=4096 at 3 bits: 384 dense words must not be read as the 410-word padded layout
    words = torch.zeros((1, 384), dtype=torch.int32)
    with pytest.raises(ValueError):
        unpack_from_int32(words, 3, (1, 4096), layout=PADDED)


@pytest.mark.parametrize("bits,shape,packed_dim", [(3, (4, 0), 1), (4, (0, 8), 1), (1, (0, 8), 0)], ids=str)
def test_pack_returns_empty_words_when_input_empty(bits, shape, packed_dim):
    helpers = _ct_helpers()
    q = torch.zeros(shape, dtype=torch.int8)
    theirs = helpers.pack_to_int32(q, bits, packed_dim=packed_dim)
    ours = pack_to_int32(q, bits, packed_dim=packed_dim)
    assert ours.shape == theirs.shape and ours.dtype == torch.int32
    assert unpack_from_int32(ours, bits, shape, packed_dim=packed_dim).shape == shape
