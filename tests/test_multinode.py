"""Lightning's multi-node path: ``num_nodes=2``, one process per node, launched the way a cluster
launches them (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``; gloo
on localhost). MainSubsidiaryPruning ends with the same gates, the same pruned shapes and the same
pruned weights on every node, and one ``pruned.pt`` that reloads to them."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from lightning_bnnprune import load_pruned

NODE = """
import sys

import lightning as L
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnnprune import Binarize, MainSubsidiaryPruning
from lightning_bnnprune.pruning.gates import gates_of

out = sys.argv[1]


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = timm.create_model("test_resnet", num_classes=10, zero_init_last=False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9)


class FinalGates(Callback):  # the gates as fit leaves them, before the removal (on_fit_end)
    def on_train_end(self, trainer, pl_module):
        self.masks = {n: g.mask().clone() for n, g in gates_of(pl_module.net).items()}
        self.logits = {n: g.logits.detach().clone() for n, g in gates_of(pl_module.net).items()}


L.seed_everything(0)
x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
msf = MainSubsidiaryPruning(target_pfr=0.4, selector=2, retrain=1, warmup=1, layers=["conv1.6", "layer2.0.conv1"])
gates = FinalGates()
model = Classifier()
trainer = L.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy=DDPStrategy(process_group_backend="gloo"),
                    max_steps=8, default_root_dir=out, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, callbacks=[Binarize(), gates, msf])
trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))  # a different half of the data per node
torch.save({"node_rank": trainer.node_rank, "global_rank": trainer.global_rank, "world_size": trainer.world_size,
            "masks": gates.masks, "logits": gates.logits, "removed": msf.record.removed,
            "shapes": {k: list(v.shape) for k, v in model.net.state_dict().items()},
            "params": {k: p.detach().clone() for k, p in model.net.named_parameters()},
            "pruned_path": msf.pruned_path}, f"{out}/node{trainer.node_rank}.pt")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_end_with_the_same_gates_shapes_and_pruned_weights(tmp_path):
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE")}
    nodes = [
        subprocess.Popen([sys.executable, "-c", NODE, str(tmp_path)], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env={**base, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank),
                              "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
        for rank in (0, 1)
    ]
    try:
        logs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)

    n0, n1 = (torch.load(tmp_path / f"node{r}.pt", weights_only=True) for r in (0, 1))
    assert [(n["node_rank"], n["global_rank"], n["world_size"]) for n in (n0, n1)] == [(0, 0, 2), (1, 1, 2)]
    assert n0["masks"].keys() == n1["masks"].keys()
    for name in n0["masks"]:
        assert torch.equal(n0["masks"][name], n1["masks"][name]), name
        assert torch.equal(n0["logits"][name], n1["logits"][name]), name
    for name in ("conv1.6", "layer2.0.conv1"):  # the layers pruned: cut, not emptied
        assert 0 < int(n0["masks"][name].sum()) < n0["masks"][name].numel(), name
    assert n0["removed"] == n1["removed"] and n0["removed"]
    assert n0["shapes"] == n1["shapes"]
    assert n0["params"].keys() == n1["params"].keys()
    for name, value in n0["params"].items():  # DDP kept the weights equal; both nodes cut them alike
        assert torch.equal(value, n1["params"][name]), name

    # global rank zero alone wrote the pruned model, and it reloads to the nodes' weights
    assert n0["pruned_path"] and n1["pruned_path"] is None
    loaded = load_pruned(Path(n0["pruned_path"]))
    for name, value in loaded.named_parameters():
        assert torch.equal(value, n0["params"][name]), name
