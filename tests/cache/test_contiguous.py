"""ContiguousKVBuffer: append, views, reset, and overflow as a clear error."""

import pytest
import torch

from kvd.cache.contiguous import ContiguousKVBuffer


def test_cat_get_data_reset():
    buf = ContiguousKVBuffer(num_layers=2, max_tokens=8, num_kv_heads=2, head_dim=4)
    k1, v1 = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    k2, v2 = torch.randn(5, 2, 4), torch.randn(5, 2, 4)
    buf.cat(0, k1, v1)
    buf.cat(0, k2, v2)
    k, v = buf.get_data(0)
    assert torch.equal(k, torch.cat([k1, k2])) and torch.equal(v, torch.cat([v1, v2]))
    assert k.is_contiguous() and buf.num_tokens(1) == 0
    ptr = k.data_ptr()
    buf.reset()
    assert len(buf) == 0 and buf.get_data(0)[0].shape == (0, 2, 4)
    buf.cat(0, k1, v1)
    assert buf.get_data(0)[0].data_ptr() == ptr  # preallocated: no new memory


def test_overflow_is_an_error_not_truncation():
    buf = ContiguousKVBuffer(num_layers=1, max_tokens=4, num_kv_heads=1, head_dim=2)
    buf.cat(0, torch.zeros(3, 1, 2), torch.zeros(3, 1, 2))
    with pytest.raises(OverflowError, match="capacity of 4"):
        buf.cat(0, torch.ones(2, 1, 2), torch.ones(2, 1, 2))
    assert buf.num_tokens(0) == 3
    with pytest.raises(OverflowError):
        buf.reserve(0, 2)
    k, _ = buf.reserve(0, 1)
    assert k.shape == (1, 1, 2) and buf.num_tokens(0) == 4


def test_shape_mismatch():
    buf = ContiguousKVBuffer(num_layers=1, max_tokens=4, num_kv_heads=2, head_dim=2)
    with pytest.raises(ValueError):
        buf.cat(0, torch.zeros(1, 1, 2), torch.zeros(1, 1, 2))
