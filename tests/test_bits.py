import numpy as np
import pytest

from onnxstack.core.bits import index_dtype, pack_codebook, packed_rows, unpack_codebook


@pytest.mark.parametrize("m,kernel", [(2, (1, 1, 1)), (5, (3, 3, 3)), (8, (4, 1, 1)), (13, (16, 3, 3)), (256, (2, 5, 3))])
def test_pack_roundtrip(m, kernel):
    rng = np.random.default_rng(m)
    D = int(np.prod(kernel))
    book = np.where(rng.standard_normal((m, D)) > 0, 1, -1).astype(np.int8)
    packed = pack_codebook(book, kernel)
    assert packed.dtype == np.uint8 and packed.shape == (packed_rows(m), *kernel)
    unpacked = unpack_codebook(packed)
    assert unpacked.shape == (8 * packed_rows(m), *kernel)
    np.testing.assert_array_equal(unpacked[:m].reshape(m, D), book)


def test_pack_rejects_wrong_kernel():
    with pytest.raises(ValueError, match="does not match kernel"):
        pack_codebook(np.ones((4, 10)), (3, 3, 1))


def test_index_dtype():
    assert index_dtype(2) == np.uint8 and index_dtype(256) == np.uint8
    assert index_dtype(257) == np.uint16 and index_dtype(65536) == np.uint16
