import json

import pytest
import yaml

from kvtuner.config import KVConfig, KVConfigError, LayerSpec, ModelFingerprint, parse_label, parse_shorthand

FP = ModelFingerprint("llama", 4, 2, 64)


@pytest.mark.parametrize("text,pair", [("KV8", (8, 8)), ("K8V4", (8, 4)), ("k4v2", (4, 2)), ("fp16", (16, 16)), ("K3V2", (3, 2))])
def test_shorthand(text, pair):
    assert parse_shorthand(text) == pair


def test_bad_shorthand():
    with pytest.raises(KVConfigError, match="cannot read KV shorthand 'K4'"):
        parse_shorthand("K4")


def test_avg_bits_is_nominal_mean():
    cfg = KVConfig([LayerSpec("kivi", 8, 4), LayerSpec("kivi", 4, 2), LayerSpec("fp16"), LayerSpec("kivi", 2, 2)])
    assert cfg.avg_bits == pytest.approx((6 + 3 + 16 + 2) / 4)
    assert KVConfig.uniform("K4V2", 30).avg_bits == 3.0


def test_json_round_trip(tmp_path):
    cfg = KVConfig([LayerSpec("kivi", 8, 4), LayerSpec("per_token", 4, 4, 64, 0), LayerSpec("fp8", 8, 8),
                    LayerSpec("fp16")], model=FP, name="mixed", meta={"seed": 1})
    path = cfg.save(tmp_path / "c.json")
    assert KVConfig.load(path) == cfg
    assert json.loads(path.read_text())["version"] == 1


def test_kvtuner_yaml_round_trip(tmp_path):
    preset = {0: {"nbits_key": 8, "nbits_value": 8}, 1: {"nbits_key": 4, "nbits_value": 2},
              2: {"nbits_key": 2, "nbits_value": 2}, 3: {"nbits_key": 4, "nbits_value": 4}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(preset))
    cfg = KVConfig.load(tmp_path / "p.yaml")
    assert [(s.k_bits, s.v_bits) for s in cfg.layers] == [(8, 8), (4, 2), (2, 2), (4, 4)]
    assert cfg.layers[0].method == "kivi" and cfg.layers[0].group_size == 32
    cfg.save(tmp_path / "back.yaml")
    assert yaml.safe_load((tmp_path / "back.yaml").read_text()) == preset


def test_layer_count_mismatch_names_both_counts():
    with pytest.raises(KVConfigError, match="config has 3 layers but the model \\(llama\\) has 4"):
        KVConfig.uniform("KV4", 3).check_model(FP)


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="kivi", k_bits=5, v_bits=4), "unsupported k_bits=5"),
    (dict(method="fp8", k_bits=4, v_bits=8), "unsupported k_bits=4 for method 'fp8'"),
    (dict(method="kivi", k_bits=4, v_bits=4, group_size=32, residual_length=48), "not a multiple of group_size"),
    (dict(method="quip", k_bits=4, v_bits=4), "unknown method 'quip'"),
    (dict(method="kivi", k_bits=4, v_bits=4, group_size=0), "group_size must be a positive"),
])
def test_spec_validation(kwargs, message):
    with pytest.raises(KVConfigError, match=message):
        LayerSpec(**kwargs)


def test_per_token_group_must_divide_head_dim():
    with pytest.raises(KVConfigError, match="group_size 48 does not divide head_dim 64"):
        KVConfig.uniform("KV4", 4, method="per_token", group_size=48, residual_length=0).check_model(FP)


@pytest.mark.parametrize("text,message", [
    ('{"layers": [', "not valid JSON"),
    ('[1, 2]', "expected an object with a 'layers' list"),
    ('{"layers": [{"k_bits": 4, "v_bits": 4, "colour": 1}]}', "layer 0 has unknown field"),
    ('{"layers": [{"k_bits": 4, "v_bits": 7}]}', "layer 0: unsupported v_bits=7"),
    ('{"layers": [], "version": 1}', "at least one layer"),
    ('{"layers": [{"k_bits": 4, "v_bits": 4}], "version": 9}', "unsupported config version 9"),
])
def test_malformed_files(tmp_path, text, message):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(KVConfigError, match=message):
        KVConfig.load(path)


def test_malformed_preset(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("0: {nbits_key: 4}\n")
    with pytest.raises(KVConfigError, match="layer 0 needs nbits_key and nbits_value"):
        KVConfig.load(path)
    with pytest.raises(KVConfigError, match="no such config file"):
        KVConfig.load(tmp_path / "missing.json")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    KVConfig.uniform("KV8", 2).save(path)
    before = path.read_text()

    def interrupted(src, dst):
        raise KeyboardInterrupt  # killed between writing the temporary file and the rename

    monkeypatch.setattr("kvtuner.config.os.replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        KVConfig.uniform("KV4", 2).save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


@pytest.mark.parametrize("label", ["K4V2", "per_token:KV8", "KV3+sink1+prerope+nuq+ds1", "K2V4+sink4", "KV3+ds0.5",
                                   "per_token:KV4+nuq"])
def test_labels_parse_back_to_the_same_spec(label):
    spec = parse_label(label)
    assert spec.label == label and parse_label(spec.label) == spec


def test_label_options():
    spec = parse_label("KV3+sink+prerope+nuq+ds", group_size=16, residual_length=64)
    assert (spec.sink, spec.pre_rope, spec.codebook, spec.outliers) == (1, True, True, 0.01)
    assert (spec.group_size, spec.residual_length) == (16, 64)
    with pytest.raises(KVConfigError, match="unknown option 'foo'"):
        parse_label("KV3+foo")
    with pytest.raises(KVConfigError, match="codebook levels are fitted for 2, 3 or 4 bits"):
        parse_label("KV8+nuq")
    with pytest.raises(KVConfigError, match="integer methods"):
        parse_label("fp8:KV8+ds1")
    with pytest.raises(KVConfigError, match="outliers must be a fraction"):
        LayerSpec("kivi", 4, 4, outliers=0.7)


def test_options_round_trip_through_json(tmp_path):
    cfg = KVConfig([parse_label("KV3+sink1+prerope+nuq+ds1"), LayerSpec("fp16")], calibration="cal.json")
    path = cfg.save(tmp_path / "c.json")
    loaded = KVConfig.load(path)
    assert loaded.layers == cfg.layers
    assert loaded.calibration == str(tmp_path / "cal.json")  # relative to the config's folder


@pytest.mark.parametrize("spec", [LayerSpec("per_token", 4, 4, 64, 0), LayerSpec("fp8", 8, 8, 16, 16),
                                  LayerSpec("kivi", 4, 2, 16, 64), parse_label("KV3+sink2+prerope")])
def test_yaml_export_keeps_method_group_and_residual(tmp_path, spec):
    """Review bug: per_token and fp8 configs reloaded from YAML as KIVI with the default group and residual."""
    cfg = KVConfig([spec, LayerSpec("fp16")])
    loaded = KVConfig.load(cfg.save(tmp_path / "c.yaml"))
    assert loaded.layers == cfg.layers
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())[0]["nbits_key"] == spec.k_bits  # KVTuner still reads it


def test_yaml_cannot_carry_a_calibration_file(tmp_path):
    with pytest.raises(KVConfigError, match="save as .json"):
        KVConfig([LayerSpec("kivi", 4, 4)], calibration="cal.json").save(tmp_path / "c.yaml")
