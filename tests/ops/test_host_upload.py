"""HostUpload: the lists of a step reach the device unchanged, packed per
dtype."""

import pytest
import torch

from pyvlm.ops.host_upload import HostUpload


def test_host_upload_packs_lists_per_dtype(device):
    staged = HostUpload()
    ids = staged.add([3, 1, 4, 1, 5], torch.int64)
    table = staged.add([[9, 2], [6, 5]], torch.int32)
    empty = staged.add([], torch.int64)
    staged.to(device)
    assert ids.tensor.device.type == device and ids.tensor.tolist() == [3, 1, 4, 1, 5]
    assert table.tensor.dtype == torch.int32 and table.tensor.tolist() == [[9, 2], [6, 5]]
    assert empty.tensor.shape == (0,)


def test_host_upload_floats_and_one_row(device):
    values = torch.randn(7).tolist()
    staged = HostUpload()
    floats, row = staged.add(values, torch.float32), staged.add([[1, 2, 3]], torch.int32)
    staged.to(device)
    assert floats.tensor.device.type == device
    assert torch.equal(floats.tensor.cpu(), torch.tensor(values))
    assert row.tensor.tolist() == [[1, 2, 3]]


def test_host_upload_takes_cpu_tensors_between_lists(device):
    """Tensors (any integer dtype, any shape) and lists of one dtype share
    its copy, each resolved to its own values."""
    rows = torch.randint(0, 1000, (2, 5), dtype=torch.int32)
    staged = HostUpload()
    first = staged.add([7, 8], torch.int64)
    table = staged.add(rows, torch.int64)
    middle = staged.add([9], torch.int64)
    span = staged.add(torch.arange(3, 6), torch.int64)
    last = staged.add([[1, 2]], torch.int64)
    staged.to(device)
    assert first.tensor.tolist() == [7, 8] and middle.tensor.tolist() == [9]
    assert table.tensor.dtype == torch.int64 and table.tensor.tolist() == rows.tolist()
    assert span.tensor.tolist() == [3, 4, 5] and last.tensor.tolist() == [[1, 2]]
    assert table.tensor.device.type == device


def test_host_upload_values_are_torch_tensors_of_the_same_lists(device):
    """The fast path through array.array gives torch.tensor's values for
    every dtype, including bools in integer lists, infinities, NaN, and a
    float in an integer list (truncated, as torch.tensor does)."""
    import random

    rng = random.Random()
    ints = [rng.randrange(-2**62, 2**62) for _ in range(300)] + [True, False]
    int32s = [rng.randrange(-2**31, 2**31) for _ in range(300)]
    floats = [rng.uniform(-1e6, 1e6) for _ in range(300)] + [1e40, float("inf"), -1e40]
    mixed = [3, 2.75, -1]
    cases = [(ints, torch.int64), (int32s, torch.int32), (floats, torch.float32),
             (floats, torch.float64), (mixed, torch.int64), (floats[:9], torch.bfloat16)]
    staged = HostUpload()
    pending = [staged.add(values, dtype) for values, dtype in cases]
    nan = staged.add([float("nan"), 1.0], torch.float32)
    staged.to(device)
    for (values, dtype), got in zip(cases, pending):
        assert torch.equal(got.tensor.cpu(), torch.tensor(values, dtype=dtype)), dtype
    assert torch.isnan(nan.tensor[0]) and nan.tensor[1] == 1.0


def test_an_int32_out_of_range_is_torch_tensors_error():
    staged = HostUpload()
    staged.add([2**31], torch.int32)
    with pytest.raises(RuntimeError):
        torch.tensor([2**31], dtype=torch.int32)
    with pytest.raises(RuntimeError):
        staged.to("cpu")
