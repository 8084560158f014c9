"""The transfer checksum without torch.dot (not implemented for integer CUDA tensors) is
bit-identical to the dot-product form it replaced, and the byte layout stays on one device."""

from __future__ import annotations

import pytest
import torch

from nemo_checkpointless.replication.transfer import ROW_WORDS, ByteLayout, _weights, checksum


def checksum_with_dot(buf: torch.Tensor) -> torch.Tensor:
    """The previous implementation, verbatim in what it computes (CPU only)."""
    n = buf.numel()
    body = n - n % 8
    if buf.data_ptr() % 8 or n % 8:
        padded = torch.zeros(body + (8 if n % 8 else 0), dtype=torch.uint8)
        padded[:n].copy_(buf)
        buf, body = padded, padded.numel()
    words = buf[:body].view(torch.int64)
    if words.numel() == 0:
        return torch.zeros(2, dtype=torch.int64)
    full = words.numel() - words.numel() % ROW_WORDS
    rows = words[:full].view(-1, ROW_WORDS).sum(1)
    if full < words.numel():
        rows = torch.cat((rows, words[full:].sum().reshape(1)))
    return torch.stack((rows.sum(), torch.dot(rows, _weights(buf.device, rows.numel()))))


@pytest.mark.parametrize("size", [0, 1, 7, 8, 4096, 4097, 3 * 4096 + 1000, 1 << 20, 4 << 20])
def test_new_checksum_equals_the_dot_form_bit_for_bit(size):
    gen = torch.Generator().manual_seed(size)
    for trial in range(3):
        data = torch.randint(0, 256, (size + 1,), dtype=torch.uint8, generator=gen)
        if trial == 1:
            data.fill_(255)  # every word -1: row sums and weighted sums wrap around 2**64
        for buf in (data[:size], data[1:size + 1]):  # aligned and unaligned starts
            if size == 0:
                assert checksum(buf).tolist() == [0, 0]
                continue
            assert torch.equal(checksum(buf), checksum_with_dot(buf)), (size, trial)


def test_byte_layout_refuses_tensors_on_two_devices_and_reports_its_device():
    layout = ByteLayout([torch.zeros(4), torch.zeros(2)])
    assert layout.device == torch.device("cpu")
    assert layout.runs[0][2].device == torch.device("cpu")
    with pytest.raises(ValueError, match="several devices"):
        ByteLayout([torch.zeros(4), torch.zeros(2, device="meta")])
