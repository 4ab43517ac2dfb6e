"""KVCacheConfig: validation on construction, dtype strings, derived sizes."""

from __future__ import annotations

import pytest
import torch

from kvcache import InvalidParameter, KVCacheConfig

BASE = dict(num_layers=2, num_kv_heads=2, head_dim=16, page_size=4, dtype="float32", device="cpu", device_pages=8)


def config(**overrides) -> KVCacheConfig:
    return KVCacheConfig(**{**BASE, **overrides})


@pytest.mark.parametrize(
    "name, dtype",
    [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)],
)
def test_dtype_strings_map_to_torch_dtypes(name, dtype):
    c = config(dtype=name)
    assert c.dtype is dtype
    assert c.itemsize == torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_dtypes_are_accepted_as_is(dtype):
    assert config(dtype=dtype).dtype is dtype


@pytest.mark.parametrize("dtype", ["fp16", "float64", "int8", "half", ""])
def test_unknown_dtype_string_raises_invalid_parameter(dtype):
    with pytest.raises(InvalidParameter, match="dtype"):
        config(dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.int32])
def test_unsupported_torch_dtype_raises_invalid_parameter(dtype):
    with pytest.raises(InvalidParameter, match="dtype"):
        config(dtype=dtype)


def test_device_string_becomes_a_torch_device():
    assert config(device="cpu").device == torch.device("cpu")


@pytest.mark.parametrize("device", ["not-a-device", "gpu", "cpu:x", ""])
def test_bad_device_string_raises_invalid_parameter(device):
    with pytest.raises(InvalidParameter, match="device"):
        config(device=device)


def test_device_of_the_wrong_type_raises_invalid_parameter():
    with pytest.raises(InvalidParameter, match="device"):
        config(device=3.5)


@pytest.mark.parametrize("name", ["num_layers", "num_kv_heads", "head_dim", "page_size", "device_pages"])
@pytest.mark.parametrize("value", [0, -1, -16])
def test_zero_or_negative_sizes_raise_invalid_parameter(name, value):
    with pytest.raises(InvalidParameter, match=name):
        config(**{name: value})


@pytest.mark.parametrize("name", ["num_layers", "num_kv_heads", "head_dim", "page_size", "device_pages"])
@pytest.mark.parametrize("value", [2.0, "4", True, None])
def test_non_int_sizes_raise_invalid_parameter(name, value):
    with pytest.raises(InvalidParameter, match=name):
        config(**{name: value})


@pytest.mark.parametrize("name", ["host_pages", "disk_pages"])
def test_negative_tier_capacities_raise_invalid_parameter(name):
    with pytest.raises(InvalidParameter, match=name):
        config(**{name: -1})


@pytest.mark.parametrize("name", ["host_pages", "disk_pages"])
def test_zero_tier_capacities_are_allowed(name):
    assert getattr(config(**{name: 0}), name) == 0


@pytest.mark.parametrize("head_dim", [4, 12, 20, 33, 60])
def test_head_dim_not_a_multiple_of_8_raises_invalid_parameter(head_dim):
    with pytest.raises(InvalidParameter, match="head_dim"):
        config(head_dim=head_dim)


@pytest.mark.parametrize("head_dim", [8, 16, 64, 128])
def test_head_dim_multiple_of_8_is_accepted(head_dim):
    assert config(head_dim=head_dim).head_dim == head_dim


def test_invalid_parameter_is_a_value_error():
    with pytest.raises(ValueError):
        config(page_size=0)


def test_config_is_frozen():
    c = config()
    with pytest.raises(AttributeError):
        c.page_size = 8  # type: ignore[misc]


def test_pages_for_rounds_up_to_whole_pages():
    c = config(page_size=4)
    assert [c.pages_for(n) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_page_bytes_counts_both_key_layouts_values_and_f32_summaries(dtype):
    c = config(dtype=dtype)
    L, H, P, d, item = 2, 2, 4, 16, c.itemsize
    assert c.page_bytes == L * (3 * H * P * d * item + H * 3 * d * 4)
