import os

import pytest
import torch

# deterministic and quick: tests use small shapes; keep thread count as the machine has
torch.manual_seed(0)


def pytest_report_header(config):
    import fusedformer

    return (
        f"fusedformer {fusedformer.__version__}, torch {torch.__version__}, "
        f"cpu capability {fusedformer.cpu_capability()} of {fusedformer.available_cpu_capabilities()}, "
        f"cuda {'yes' if torch.cuda.is_available() and fusedformer.built_with_cuda() else 'no'}, "
        f"threads {torch.get_num_threads()}"
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
