"""Protocols (exps/protocols/*.json): laid over a method config, under the command line, recorded, checked."""
import json
from pathlib import Path

import pytest

from utils.config import ConfigError, build_config, load_config

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = sorted((ROOT / "exps" / "protocols").glob("*.json"))
METHOD_CONFIGS = sorted((ROOT / "exps").glob("*_c100.json"))

#: The offline protocol as run.sh and the README's tables wrote it out before it was a file (SHARED = ../shared).
OFFLINE_OVERRIDES = {
    "dataset": "cifar100", "data_path": "../shared/data/cifar100/cifar100.npz", "download": False,
    "backbone_type": "vit_small_patch14_dinov2",
    "pretrained_path": "../shared/weights/vit_small_patch14_dinov2.imgfocus.fp16.safetensors",
    "img_size": 112, "init_cls": 10, "increment": 10, "train_per_class": 50, "test_per_class": 20,
    "epochs": 5, "batch_size": 32, "num_workers": 0, "progress": False, "augment_on": "loader"}


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # protocol paths are relative to the repository root, as run.sh runs them


def test_the_unnormalised_offline_protocol_is_the_old_command_line_key_for_key():
    for cfg_path in ("exps/sdlora_c100.json", "exps/schedule_c100.json", "exps/gumbel_c100.json",
                     "exps/inflora_c100.json"):
        by_file = load_config(cfg_path, {"protocol": "exps/protocols/offline_unnormalised.json"}).to_dict()
        by_flags = load_config(cfg_path, OFFLINE_OVERRIDES).to_dict()
        assert by_file.pop("protocol") == "exps/protocols/offline_unnormalised.json"
        assert by_flags.pop("protocol") is None
        assert by_file == by_flags


@pytest.mark.parametrize("name", ["offline", "quick"])
def test_each_protocol_is_its_unnormalised_one_with_normalisation(name):
    keys = {n: json.loads((ROOT / f"exps/protocols/{n}.json").read_text())["keys"]
            for n in (name, f"{name}_unnormalised")}
    assert keys[name] == dict(keys[f"{name}_unnormalised"], normalize=True)
    assert keys[f"{name}_unnormalised"]["normalize"] is False


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.stem)
def test_every_protocol_applies_to_every_method_config(protocol):
    for cfg_path in METHOD_CONFIGS:
        cfg = load_config(str(cfg_path), {"protocol": str(protocol.relative_to(ROOT))})
        keys = json.loads(protocol.read_text())["keys"]
        assert all(getattr(cfg, k) == v for k, v in keys.items()), cfg_path
    assert json.loads(protocol.read_text())["description"]


def test_precedence_file_then_protocol_then_command_line(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"epochs": 20, "batch_size": 128, "lrate": 0.01, "protocol": "exps/protocols/quick.json"}))
    quick = json.loads((ROOT / "exps/protocols/quick.json").read_text())["keys"]
    cfg = load_config(str(p), {"batch_size": 7})
    assert cfg.epochs == quick["epochs"] and cfg.batch_size == 7 and cfg.lrate == 0.01
    assert cfg.protocol == "exps/protocols/quick.json"
    # the saved config holds the protocol's keys already: building it again (resume, fork) gives the same run
    assert build_config(cfg.to_dict()) == cfg


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist; shipped protocols: exps/protocols/"),
    ("{not json", "not valid JSON"),
    ({"epochs": 1}, "must be {\"description\""),
    ({"keys": {"epochs": 1}, "note": "x"}, "has fields ['note']"),
    ({"keys": {"model_name": "seq_lora"}}, "may not set 'protocol' or 'model_name'"),
    ({"keys": {"epoch": 1}}, "Did you mean 'epochs'"),
])
def test_a_bad_protocol_file_is_named(tmp_path, content, needle):
    path = tmp_path / "p.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError) as e:
        load_config(None, {"protocol": str(path)})
    assert needle in str(e.value)
