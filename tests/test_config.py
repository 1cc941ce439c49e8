"""The schema rejects what it cannot run, naming the key; the command line wins over the file."""
import json

import pytest

from main import main, resolve_device
from utils.config import ConfigError, build_config, load_config, parse_overrides


def test_defaults_and_resolution():
    cfg = build_config({})
    assert cfg.model_name == "sdlora" and cfg.lora_targets == ["q", "v"] and cfg.seeds == [1993]
    assert build_config({"seed": [1, 2]}).seeds == [1, 2]


@pytest.mark.parametrize("raw, needle", [
    ({"lrat": 0.1}, "Did you mean 'lrate'"),
    ({"epochs": "20"}, "'epochs'"),
    ({"epochs": 0}, "'epochs' = 0 must be > 0"),
    ({"optimizer": "rmsprop"}, "one of \"sgd\", \"adam\", \"adamw\""),
    ({"lora_targets": ["q", "x"]}, "'lora_targets'"),
    ({"memory_size": 2000}, "rehearsal is not supported"),
    ({"filepath": "./CF100/"}, "use \"log_dir\""),
    ({"lambda_sparsity": 0.3}, "not used by model_name 'sdlora'"),
    ({"milestones": [10]}, "multistep"),
    ({"model_name": "gumbel_sdlora", "prune_samples": 5}, "prune_rule"),
    ({"model_name": "sdlora", "lambda_sparsity": 0.5}, "not used by model_name"),
    ({"model_name": "gumbel_sdlora", "gate_scope": "previous", "prune_scope": "new"}, "can never prune"),
    ({"lrate": float("nan")}, "'lrate'"),
    ({"model_name": "gumbel_sdlora", "epochs": 1}, "leaves phase 2"),
    ({"model_name": "gumbel_sdlora", "two_phase": False, "phase1_fraction": 0.5}, "only applies with"),
    ({"crop_scale": [0.9, 0.1]}, "'crop_scale'"),
])
def test_rejections_name_the_key(raw, needle):
    with pytest.raises(ConfigError) as e:
        build_config(raw)
    assert needle in str(e.value)


def test_overrides_parse_json_and_win(tmp_path):
    assert parse_overrides(["--epochs", "1", "--pretrained", "false", "--lora_targets", '["q"]',
                            "--prefix=x", "--backbone_type", "vit_tiny_patch16_224"]) == {
        "epochs": 1, "pretrained": False, "lora_targets": ["q"], "prefix": "x",
        "backbone_type": "vit_tiny_patch16_224"}
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"epochs": 5, "batch_size": 8}))
    cfg = load_config(str(p), {"epochs": 1})
    assert cfg.epochs == 1 and cfg.batch_size == 8
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--epochs"])


def test_cli_stops_before_any_work(tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"epochs": 1, "log_dir": str(tmp_path / "logs"), "lrat": 1}))
    assert main([f"--config={p}"]) == 2
    assert "unknown config key 'lrat'" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_missing_data_shows_layout(tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"data_path": str(tmp_path / "nope"), "log_dir": str(tmp_path / "logs")}))
    assert main([f"--config={p}", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cifar-100-python" in err and "download" in err


def test_unknown_backbone_is_rejected(tiny, tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(dict(tiny, backbone_type="vit_nonexistent_model")))
    assert main([f"--config={p}"]) == 2
    assert "unknown timm model 'vit_nonexistent_model'" in capsys.readouterr().err


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError):
        resolve_device(["0", "1"])


def test_shipped_configs_load_and_the_seed_config_is_the_notes_formulation():
    from tests.conftest import ROOT
    for f in sorted((ROOT / "exps").glob("*.json")):
        load_config(str(f))  # every shipped config passes the schema
    seed = load_config(str(ROOT / "exps" / "gumbel_seed.json"))
    assert (seed.gumbel_tau_init, seed.gumbel_tau_final, seed.gumbel_anneal_rate) == (5.0, 0.5, 0.999)
    assert (seed.lambda_sparsity, seed.alpha_lr, seed.alpha_init, seed.phase1_fraction) == (0.1, 0.04, 1.0, 0.6)
    assert (seed.prune_rule, seed.prune_threshold, seed.prune_samples) == ("frequency", 0.2, 10)
    assert (seed.gate_scope, seed.warmup_fraction, seed.growth_cost, seed.gumbel_tau_schedule) == \
        ("all", 0.0, 0.0, "step")
    gate = load_config(str(ROOT / "exps" / "gumbel_c100.json"))  # the Gumbel gate's growth rule
    assert (gate.gate_scope, gate.gumbel_tau_schedule) == ("new", "phase") and gate.warmup_fraction > 0
    sd = load_config(str(ROOT / "exps" / "sdlora_c100.json")).to_dict()
    growth = ("prefix", "skip_mode", "growth_schedule", "novelty_threshold", "max_share", "novelty_reference")
    shipped = load_config(str(ROOT / "exps" / "schedule_c100.json"))  # the shipped default: a schedule (growth.md)
    assert (shipped.model_name, shipped.skip_mode, shipped.growth_schedule) == ("sdlora", "reuse", [0, 3, 6])
    novelty = load_config(str(ROOT / "exps" / "novelty_c100.json"))  # the rule, an option
    assert (novelty.novelty_threshold, novelty.max_share, novelty.novelty_reference) == (0.045, 5, "nearest")
    for cfg in (shipped, novelty):  # SD-LoRA's setup otherwise
        assert {k: v for k, v in cfg.to_dict().items() if k not in growth} == \
            {k: v for k, v in sd.items() if k not in growth}


def test_a_method_declares_its_own_keys_in_its_file():
    """A registered method's keys join the schema: typed and checked, refused for other methods (naming the
    owner), flat in to_dict, kept by dataclasses.replace, listed by --keys; model_name comes from the registry."""
    import dataclasses

    from models import REGISTRY, register
    from models.base import Learner
    from utils.config import METHOD_SPECS, _key, _positive, describe_keys

    @dataclasses.dataclass
    class ToyKeys:
        toy_strength: float = _key(0.5, "how strong the toy is", check=_positive)

    def toy_check(cfg, raw):
        return ["toy_strength above 2 needs epochs >= 2"] if cfg.toy_strength > 2 and cfg.epochs < 2 else []

    try:
        register("toy_method", keys=ToyKeys, uses=("lora_rank",), check=toy_check)(type("Toy", (Learner,), {}))
        cfg = build_config({"model_name": "toy_method", "toy_strength": 1.5, "lora_rank": 3})
        assert cfg.toy_strength == 1.5 and cfg.lora_rank == 3 and cfg.to_dict()["toy_strength"] == 1.5
        assert "method_keys" not in cfg.to_dict()
        assert dataclasses.replace(cfg, seed=5).toy_strength == 1.5
        assert build_config(cfg.to_dict()).to_dict() == cfg.to_dict()  # config.json reloads as it was
        assert build_config({"model_name": "toy_method"}).toy_strength == 0.5
        with pytest.raises(ConfigError, match=r"'toy_strength' = -1 must be > 0"):
            build_config({"model_name": "toy_method", "toy_strength": -1})
        with pytest.raises(ConfigError, match=r"'toy_strength' = \"x\" should be float"):
            build_config({"model_name": "toy_method", "toy_strength": "x"})
        with pytest.raises(ConfigError, match="toy_strength above 2 needs epochs"):
            build_config({"model_name": "toy_method", "toy_strength": 3, "epochs": 1})
        with pytest.raises(ConfigError, match="'toy_strength' belongs to model_name 'toy_method'"):
            build_config({"model_name": "sdlora", "toy_strength": 1.0})
        with pytest.raises(ConfigError, match="Did you mean 'toy_strength'"):
            build_config({"model_name": "toy_method", "toy_strenght": 1.0})
        with pytest.raises(ConfigError, match="'lora_rank' is not used by model_name 'linear_probe'"):
            build_config({"model_name": "linear_probe", "lora_rank": 3})
        assert "toy_strength" in describe_keys() and "[toy_method]" in describe_keys()
    finally:
        REGISTRY.pop("toy_method", None)
        METHOD_SPECS.pop("toy_method", None)
    with pytest.raises(ConfigError, match='model_name\' = "toy_method" should be one of .*"sdlora"'):
        build_config({"model_name": "toy_method"})


def test_coda_cosine_schedule_matches_its_formula():
    import math

    import torch

    from utils.optim import build_scheduler
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    sched = build_scheduler("coda_cosine", opt, 20, None, 0.1, 0.0)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5 * math.cos(99 * math.pi * e / (200 * 19)) for e in range(20)], rel=1e-12)
    assert lrs[-1] == pytest.approx(0.5 * 0.0157, rel=0.01)


def test_gumbel_keys_live_in_its_file_and_an_earlier_config_json_still_loads():
    """Gumbel CL-LoRA's keys are its own (models/gumbel_keys.py); a run folder's config.json from before they
    moved lists every one at its default under any method, and must load (and resume) as it did."""
    import dataclasses
    import utils.config.schema as schema
    from models.gumbel_keys import GumbelKeys
    names = {f.name for f in dataclasses.fields(GumbelKeys)}
    assert not names & {f.name for f in dataclasses.fields(schema.Config)}
    earlier = {f.name: f.default for f in dataclasses.fields(GumbelKeys)}
    cfg = build_config(dict(earlier, model_name="sdlora"))
    assert not names & set(cfg.to_dict())
    assert build_config(dict(earlier, model_name="gumbel_sdlora")).lambda_sparsity == 0.1
    with pytest.raises(ConfigError, match="'growth_cost' belongs to model_name 'gumbel_sdlora' and is not used by "
                                          "model_name 'sdlora'"):
        build_config({"model_name": "sdlora", "growth_cost": 0.04})
    with pytest.raises(ConfigError, match="'gumbel_tau_final' must be <= 'gumbel_tau_init'"):
        build_config({"model_name": "gumbel_sdlora", "gumbel_tau_final": 9.0})
