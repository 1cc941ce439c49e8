"""Device placement by construction, checked on CPU: on the 'meta' device any tensor that the hot
path creates on the host, or any value it reads back from the device, fails loudly."""
import pytest
import torch
from torch import nn

from backbone.gate import AdapterGate, GumbelGate
from backbone.vit import LoRAViT, create_vit
from main import resolve_device
from utils.config import ConfigError


def build(gate, strategy):
    vit = create_vit("vit_tiny_patch16_224", False, None, 32, dict(patch_size=8, depth=2, embed_dim=48, num_heads=3))
    net = LoRAViT(vit, gate, ("q", "v"), "factors", strategy).to("meta")
    for t in range(3):
        net.add_task(t, 3, 0.8)
        if t < 2:
            net.freeze_current()
    return net


@pytest.mark.parametrize("strategy", ["stacked", "merged", "auto", "loop"])
@pytest.mark.parametrize("gate_cls", [AdapterGate, GumbelGate])
def test_training_step_stays_on_the_model_device(strategy, gate_cls):
    net = build(gate_cls(2), strategy)
    head = nn.Linear(48, 5, device="meta")
    params = [p for p in list(net.parameters()) + list(head.parameters()) if p.requires_grad]
    assert all(p.device.type == "meta" for p in params)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 32, 32, device="meta")
    for _ in range(2):
        loss = nn.functional.cross_entropy(head(net(x)), torch.zeros(2, dtype=torch.long, device="meta"))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(b.device.type == "meta" for layer in net.layers for b in layer.buffers())


def test_eval_merge_stays_on_the_model_device():
    net = build(AdapterGate(2), "auto")
    net.eval()
    with torch.no_grad():
        y = net(torch.randn(2, 3, 32, 32, device="meta"))
    assert y.device.type == "meta" and all(layer._merged.device.type == "meta" for layer in net.layers)


def test_missing_gpu_is_an_error_not_a_fallback():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device(["0"])
    assert resolve_device("auto").type == "cpu"


def test_amp_on_cpu_is_rejected(tiny, tmp_path, capsys):
    import json
    from main import main
    p = tmp_path / "c.json"
    p.write_text(json.dumps(dict(tiny, amp=True)))
    assert main([f"--config={p}"]) == 2
    assert "need a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()  # stopped before any work
