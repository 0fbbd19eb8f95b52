"""The seeds' checkpoint formats load and reproduce the original layouts' logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from model_store.checkpoints import CheckpointError, import_checkpoint


class SeedClassificationModel3D(nn.Module):
    """Verbatim layout of cnn-interpretability's model: one shared ReLU, functional pooling."""

    def __init__(self, dropout=0.8, dropout2=0.8):
        nn.Module.__init__(self)
        self.Conv_1 = nn.Conv3d(1, 8, 3)
        self.Conv_1_bn = nn.BatchNorm3d(8)
        self.Conv_2 = nn.Conv3d(8, 16, 3)
        self.Conv_2_bn = nn.BatchNorm3d(16)
        self.Conv_3 = nn.Conv3d(16, 32, 3)
        self.Conv_3_bn = nn.BatchNorm3d(32)
        self.Conv_4 = nn.Conv3d(32, 64, 3)
        self.Conv_4_bn = nn.BatchNorm3d(64)
        self.dense_1 = nn.Linear(5120, 128)
        self.dense_2 = nn.Linear(128, 64)
        self.dense_3 = nn.Linear(64, 2)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout2)

    def forward(self, x):
        x = self.relu(self.Conv_1_bn(self.Conv_1(x)))
        x = F.max_pool3d(x, 2)
        x = self.relu(self.Conv_2_bn(self.Conv_2(x)))
        x = F.max_pool3d(x, 3)
        x = self.relu(self.Conv_3_bn(self.Conv_3(x)))
        x = F.max_pool3d(x, 2)
        x = self.relu(self.Conv_4_bn(self.Conv_4(x)))
        x = F.max_pool3d(x, 3)
        x = x.view(x.size(0), -1)
        x = self.dropout(x)
        x = self.relu(self.dense_1(x))
        x = self.dropout2(x)
        x = self.relu(self.dense_2(x))
        return self.dense_3(x)


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial running statistics, so a BN mix-up would change the logits."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize("depth,pooling", [(18, "avg"), (18, "max"), (152, "max")])
def test_deepminer_pth_tar_reproduces_logits(tmp_path, depth, pooling):
    torch.manual_seed(depth)
    original = getattr(models, f"resnet{depth}")(weights=None)
    original.fc = nn.Linear(original.fc.in_features, 3)
    if pooling == "max":  # the port's change: global max instead of average pooling
        original.avgpool = nn.AdaptiveMaxPool2d(1)
    _randomise_bn(original)
    wrapped = nn.DataParallel(original)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 12, "arch": f"resnet{depth}", "state_dict": wrapped.state_dict(), "best_prec1": 71.3,
                "optimizer": torch.optim.SGD(original.parameters(), lr=0.1).state_dict()}, path)
    assert all(k.startswith("module.") for k in torch.load(path, weights_only=True)["state_dict"])

    imported = import_checkpoint(path, "ddsm", pooling=pooling)
    assert imported.config.depth == depth
    x = torch.randn(2, 3, 227, 227)
    original.eval()
    with torch.no_grad():
        assert torch.allclose(imported(x), original(x), atol=1e-4)


def test_cnn_interpretability_state_dict_reproduces_logits(tmp_path):
    torch.manual_seed(1)
    original = SeedClassificationModel3D()
    _randomise_bn(original)
    path = tmp_path / "model.pt"
    torch.save(original.state_dict(), path)

    imported = import_checkpoint(path, "adni")
    assert imported.flatten_size == 5120
    x = torch.randn(1, 1, 193, 229, 193)
    original.eval()
    with torch.no_grad():
        assert torch.allclose(imported(x), original(x), atol=1e-4)


def test_wrong_input_grid_is_explained(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(SeedClassificationModel3D().state_dict(), path)
    with pytest.raises(CheckpointError, match="input grid"):
        import_checkpoint(path, "adni", input_shape=(97, 115, 97))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "model": nn.Linear(2, 2)}, path)  # a pickled module, not a state dict
    with pytest.raises(CheckpointError, match="pickled objects"):
        import_checkpoint(path, "ddsm")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError):
        import_checkpoint(path, "ddsm")
