"""HostUpload: the lists of a step reach the device unchanged, packed per
dtype."""

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
