"""Helpers shared by the test files."""
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parent / 'fixtures' / 'official_bvit_5m_golden.pt'


@pytest.fixture
def one_torch_thread():
    """One torch thread: the models of these tests are tiny, and two threads on two shared cores can
    make every op wait for a descheduled worker. ``--threads`` changes the same process-wide
    setting; the other tests get theirs back."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def released_file_10_classes(folder: Path) -> Path:
    """The golden fixture's weights in the released float16 layout, the head cut to 10 classes
    (the DIGITS classes), saved Lightning-style under 'state_dict'."""
    sd = dict(torch.load(GOLDEN, weights_only=True)['state_dict'])
    assert 'mlp_head.1.weight' in sd and sd['mlp_head.1.weight'].dtype == torch.float16
    sd['mlp_head.1.weight'] = sd['mlp_head.1.weight'][:10].clone()
    sd['mlp_head.1.bias'] = sd['mlp_head.1.bias'][:10].clone()
    path = folder / 'released.pth'
    torch.save({'state_dict': sd}, path)
    return path
