"""Data-parallel training: a fusedformer model trained for a few steps under
DistributedDataParallel (gloo, 2 local processes) ends with the gradients and parameters of the
same training run in one process on the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD, STEPS, BATCH, L, D = 2, 3, 8, 6, 32


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        import fusedformer.nn as fnn

        layer = fnn.TransformerEncoderLayer(D, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = fnn.TransformerEncoder(layer, 2, norm=fnn.LayerNorm(D), enable_nested_tensor=False)
        self.head = torch.nn.Linear(D, 1)

    def forward(self, x, pad):
        return self.head(self.encoder(x, src_key_padding_mask=pad)).squeeze(-1)


def _model():
    torch.manual_seed(0)
    return Tiny()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, BATCH, L, D, generator=g)
    y = torch.randn(STEPS, BATCH, L, generator=g)
    pad = torch.zeros(STEPS, BATCH, L, dtype=torch.bool)
    pad[:, ::3, -2:] = True
    return x, y, pad


def _train(model, x, y, pad):
    """SGD steps on a mean loss; returns the last step's gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for s in range(x.size(0)):
        opt.zero_grad()
        loss = ((model(x[s], pad[s]) - y[s]) ** 2 * (~pad[s])).mean()
        loss.backward()
        opt.step()
    return [p.grad.detach().clone() for p in model.parameters()]


def _worker(rank, port, out_path):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        x, y, pad = _data()
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        grads = _train(model, x[:, shard], y[:, shard], pad[:, shard])
        if rank == 0:
            torch.save({"grads": grads, "params": [p.detach() for p in model.module.parameters()]}, out_path)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_ddp_matches_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    ddp = torch.load(out)

    model = _model()
    grads = _train(model, *_data())
    for a, b in zip(ddp["grads"], grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(ddp["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-6)
    # the run trained: parameters moved from their initial values
    assert any(not torch.allclose(a, b) for a, b in zip(ddp["params"], _model().parameters()))
