"""HostUpload and upload(): the lists of a step reach the device unchanged,
packed per dtype."""

import torch

from pyvlm.ops.host_upload import HostUpload, upload


def test_host_upload_packs_lists_per_dtype(device):
    staged = HostUpload()
    ids = staged.add([3, 1, 4, 1, 5], torch.int64)
    table = staged.add([[9, 2], [6, 5]], torch.int32)
    empty = staged.add([], torch.int64)
    staged.to(device)
    assert ids.tensor.device.type == device and ids.tensor.tolist() == [3, 1, 4, 1, 5]
    assert table.tensor.dtype == torch.int32 and table.tensor.tolist() == [[9, 2], [6, 5]]
    assert empty.tensor.shape == (0,)


def test_upload_one_list(device):
    values = torch.randn(7).tolist()
    out = upload(values, torch.float32, device)
    assert out.device.type == device and torch.equal(out.cpu(), torch.tensor(values))
    assert upload([[1, 2, 3]], torch.int32, device).tolist() == [[1, 2, 3]]
