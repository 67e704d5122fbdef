"""kvtuner calibrate on a tiny model: what it fits, and that cache and profiler read it alike."""

import copy

import pytest
import torch

from kvtuner.config import KVConfig, KVConfigError, LayerSpec, parse_label
from kvtuner.evaluate import Evaluator
from kvtuner.method import Calibration, KVMethod, levels_key, thresholds_key
from kvtuner.profile import BlockwiseEvaluator
from kvtuner.profile.calibrate import calibrate, capture_activations

G = 16  # tiny_llama: head_dim 16
SPEC = parse_label("KV3+sink1+prerope+nuq+ds2", group_size=G, residual_length=32)
KVQUANT = parse_label("kvquant:KV2+sink1+prerope+nuq+ds2", group_size=G, residual_length=32)


def windows(count=2, length=96, seed=0):
    return torch.randint(0, 128, (count, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fitted(tiny_llama):
    return calibrate(tiny_llama, windows(), [SPEC, parse_label("K2V4+nuq", group_size=G, residual_length=32), KVQUANT])


def test_gradients_are_the_loss_gradients_wrt_k_and_v(tiny_llama):
    """Finite differences: nudging layer 1's keys along a direction moves the loss by <grad, direction>."""
    import torch.nn.functional as F

    from kvtuner.profile.calibrate import _probing

    model = copy.deepcopy(tiny_llama).double()
    ids = windows(1, 32)
    acts = capture_activations(model, ids)
    assert len(acts.keys) == 3 and acts.keys[0].shape == (1, 2, 32, 16)
    direction = torch.randn(1, 2, 32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss(eps: float) -> float:
        zeros = [torch.zeros(1, 2, 32, 16, dtype=torch.float64) for _ in range(3)]
        probe_k = [eps * direction if i == 1 else z for i, z in enumerate(zeros)]
        with _probing(model), torch.no_grad():
            logits = model(ids, use_cache=False, kvtuner_probe=(probe_k, zeros, {})).logits
        return float(F.cross_entropy(logits[0, :-1], ids[0, 1:]))

    # Llama's RMSNorm computes in float32 even in a float64 model: smaller steps drown in its rounding
    eps = 1e-3
    numeric = (loss(eps) - loss(-eps)) / (2 * eps)
    assert numeric == pytest.approx(float((acts.key_grad[1].double() * direction).sum()), rel=1e-2)
    assert all(p.requires_grad for p in model.parameters())  # the model is left as found
    assert model.config._attn_implementation != "kvtuner_calibrate"


def test_fits_what_each_spec_needs(fitted):
    assert set(fitted.levels) == {levels_key(SPEC, "k"), levels_key(SPEC, "v"), levels_key(KVQUANT, "k"),
                                  levels_key(KVQUANT, "v"), "k:kivi:g16:b2:post:o0", "v:kivi:g16:b4:post:o0"}
    assert set(fitted.thresholds) == {thresholds_key(SPEC, "k"), thresholds_key(SPEC, "v")}  # kvquant's are the same
    assert fitted.levels[levels_key(KVQUANT, "k")][0].shape == (2, 16, 4)  # one table per (head, channel)
    for levels in fitted.levels[levels_key(SPEC, "k")]:
        assert levels.shape == (8,) and levels[0] == 0 and levels[-1] == 7 and torch.all(levels.diff() > 0)
    lo, hi = fitted.thresholds[thresholds_key(SPEC, "k")][0]
    assert lo.shape == (2, 16) and torch.all(lo < hi)  # per (head, channel)
    lo, hi = fitted.thresholds[thresholds_key(SPEC, "v")][0]
    assert lo.shape == (2,)  # per head


def test_file_round_trip_and_model_check(fitted, tmp_path, tiny_llama):
    loaded = Calibration.load(fitted.save(tmp_path / "cal.json"))
    for key, layers in fitted.levels.items():
        assert all(torch.equal(a, b) for a, b in zip(layers, loaded.levels[key]))
    for key, layers in fitted.thresholds.items():
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(layers, loaded.thresholds[key]))
    assert loaded.model == fitted.model and loaded.meta == fitted.meta
    from kvtuner.cache import fingerprint

    loaded.check_model(fingerprint(tiny_llama.config))
    with pytest.raises(KVConfigError, match="was fitted for"):
        loaded.check_model(fingerprint(copy.deepcopy(tiny_llama.config).__class__(**{**tiny_llama.config.to_dict(),
                                                                                       "num_hidden_layers": 4})))
    with pytest.raises(KVConfigError, match="no such calibration file"):
        Calibration.load(tmp_path / "missing.json")


def test_profile_equals_evaluator_with_every_option(tiny_llama, fitted, tmp_path):
    """The seam's promise: the one-pass profiler and the chunked cache store the same thing, options included."""
    model = copy.deepcopy(tiny_llama).double()
    tokens = windows(1, 160, seed=3)
    fast = BlockwiseEvaluator(model, tokens, capture=True, calibration=fitted)
    reference = Evaluator(model, tokens, calibration=fitted)
    for spec in (SPEC, KVQUANT, parse_label("K4V2+sink2+prerope", group_size=G, residual_length=32)):
        config = KVConfig([spec if i == 1 else LayerSpec("fp16") for i in range(3)])
        assert fast.kl_single(1, spec) == pytest.approx(reference.evaluate(config).kl, rel=1e-5, abs=1e-12)


def test_codebook_lowers_the_weighted_error_it_was_fitted_for(tiny_llama, fitted):
    """NUQ levels beat the uniform grid on the calibration activations' Fisher-weighted error."""
    acts = capture_activations(tiny_llama, windows())
    spec = parse_label("K2V4+nuq", group_size=G, residual_length=32)
    cal_k = fitted.side(0, spec, "k")
    plain, nuq = KVMethod(LayerSpec("kivi", 2, 4, G, 32)), KVMethod(spec, cal_k, fitted.side(0, spec, "v"))
    x, w = acts.keys[0], acts.key_grad[0].square()
    positions = acts.positions
    err = {name: float((w * (m.roundtrip(x, x, positions)[0] - x).square()).sum()) for name, m in
           (("plain", plain), ("nuq", nuq))}
    assert err["nuq"] < err["plain"]


def test_a_config_names_its_calibration_file(tiny_llama, fitted, tmp_path):
    from kvtuner.cache import MixedPrecisionCache

    cfg = KVConfig([SPEC] * 3)
    with pytest.raises(KVConfigError, match="names no calibration file"):
        MixedPrecisionCache(cfg, tiny_llama.config)
    fitted.save(tmp_path / "cal.json")
    cfg.calibration = "cal.json"
    loaded = KVConfig.load(cfg.save(tmp_path / "cfg.json"))
    cache = MixedPrecisionCache(loaded, tiny_llama.config)
    assert cache.layers[0].method.key_calibration.levels is not None
