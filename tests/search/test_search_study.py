import copy
import json

import optuna
import pytest
from optuna.trial import TrialState

from kvtuner.config import KVConfig, LayerSpec
from kvtuner.profile import BlockwiseEvaluator
from kvtuner.search import SearchError, SearchSettings, run_search


def settings(**kw) -> SearchSettings:
    base = dict(trials=16, groups=2, population=4, budgets=(3.0, 4.0, 6.0), seed_step=1.0)
    return SearchSettings(**{**base, **kw})


def test_search_end_to_end(tiny_llama, tiny_profile, tiny_ids, tmp_path):
    """In float64: the one-pass and the chunked held-out KLs attend in different orders, which quantization
    amplifies in float32 (benchmarks/eval_noise.py) to a few 1e-3 of a 3e-6 KL and the whole of a 1e-8 one."""
    calib, valid = tiny_ids
    model = copy.deepcopy(tiny_llama).double()
    result = run_search(model, tiny_profile, calib, valid, settings(), tmp_path)
    assert result.sizes.full == 7**3 and result.sizes.clustered <= result.sizes.pruned <= result.sizes.full
    assert result.study["complete"] == 16
    # the front is non-dominated and sorted by bits
    front = [(p.avg_bits, p.loss) for p in result.front]
    assert front == sorted(front) and all(a[1] > b[1] for a, b in zip(front, front[1:]))
    for pick in result.budgets:
        assert pick.best.avg_bits <= pick.budget
        # the exact additive optimum is measured too, so the pick is never worse than it
        assert pick.best.loss <= pick.additive.loss
        assert pick.uniform.avg_bits <= pick.budget
        assert pick.best.heldout == pytest.approx(pick.best.heldout_reference, rel=1e-3)
        config = KVConfig.load(tmp_path / f"config_{pick.budget}.json")
        assert config.avg_bits <= pick.budget and config.meta["kl_heldout"] == pick.best.heldout
    assert result.correlation["n"] >= 3
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["space_sizes"]["full"]["exact"] == str(7**3)
    assert (tmp_path / "front.png").stat().st_size > 0


def test_hard_budget_is_an_optuna_constraint(tiny_llama, tiny_profile, tiny_ids, tmp_path):
    result = run_search(tiny_llama, tiny_profile, tiny_ids[0], None,
                        settings(trials=12, max_avg_bits=4.0, budgets=(4.0,)), tmp_path)
    study = optuna.load_study(study_name="kvtuner", storage=result.study["storage"])
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert all("avg_bits" in t.constraints for t in complete)
    assert all(t.user_attrs["avg_bits"] <= 4.0 for t in study.best_trials)
    assert all(p.avg_bits <= 4.0 for p in result.front if p.source == "trial")


def test_resume_after_interrupt_keeps_finished_trials(tiny_llama, tiny_profile, tiny_ids, tmp_path):
    evaluator = BlockwiseEvaluator(tiny_llama, tiny_ids[0])
    calls = []

    def interrupted(config):
        calls.append(config)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as if Ctrl-C hit in the middle of a trial
        return evaluator.kl(config)

    with pytest.raises(KeyboardInterrupt):
        run_search(tiny_llama, tiny_profile, tiny_ids[0], None, settings(), tmp_path, measure=interrupted)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    before = optuna.load_study(study_name="kvtuner", storage=storage).get_trials()
    finished = {t.number: t.values for t in before if t.state == TrialState.COMPLETE}
    assert len(finished) >= 4 and [t.state for t in before].count(TrialState.FAIL) == 1

    with pytest.raises(SearchError, match="already exists.*--resume"):
        run_search(tiny_llama, tiny_profile, tiny_ids[0], None, settings(), tmp_path, measure=evaluator.kl)

    result = run_search(tiny_llama, tiny_profile, tiny_ids[0], None, settings(resume=True), tmp_path,
                        measure=evaluator.kl)
    after = optuna.load_study(study_name="kvtuner", storage=storage).get_trials(states=(TrialState.COMPLETE,))
    assert len(after) == 16 and result.study["seeded"] == 0
    assert {t.number: t.values for t in after if t.number in finished} == finished


def test_resume_refuses_another_space(tiny_llama, tiny_profile, tiny_ids, tmp_path):
    run_search(tiny_llama, tiny_profile, tiny_ids[0], None, settings(trials=2), tmp_path)
    with pytest.raises(SearchError, match="another search space"):
        run_search(tiny_llama, tiny_profile, tiny_ids[0], None, settings(trials=2, groups=3, resume=True), tmp_path)


@pytest.mark.parametrize("kw,message", [
    (dict(budgets=(1.5,)), "budget 1.5 bits is below the smallest pair KV2 \\(2 bits\\)"),
    (dict(max_avg_bits=1.0), "--max-avg-bits 1 bits is below the smallest pair"),
    (dict(sampler="cmaes"), "unknown sampler 'cmaes'"),
    (dict(trials=0), "--trials must be at least 1"),
])
def test_bad_settings(tiny_llama, tiny_profile, tiny_ids, tmp_path, kw, message):
    with pytest.raises(SearchError, match=message):
        run_search(tiny_llama, tiny_profile, tiny_ids[0], None, settings(**kw), tmp_path)


def test_kv_bytes_objective_and_limit(tiny_llama, tiny_profile, tiny_ids, tmp_path):
    full = run_search(tiny_llama, tiny_profile, tiny_ids[0], None, settings(trials=2, study_name="probe"), tmp_path)
    kv8 = next(p for p in full.uniform if p.name == "uniform KV8").kv_bytes
    limit = kv8 // 2
    result = run_search(tiny_llama, tiny_profile, tiny_ids[0], None,
                        settings(trials=10, size="kv_bytes", max_kv_bytes=limit, budgets=(8.0,)), tmp_path)
    assert result.budgets[0].best.kv_bytes <= limit
    study = optuna.load_study(study_name="kvtuner", storage=result.study["storage"])
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        assert t.values[1] == t.user_attrs["kv_bytes"] and "kv_bytes" in t.constraints
        assert t.user_attrs["measured"] == (t.user_attrs["kv_bytes"] <= limit)


def test_costs_are_real_bytes_and_overhead_caps_the_picks(tiny_llama, tiny_ids, tmp_path):
    """Candidates are costed by the bytes they really store on the calibration tokens (a sink and pre-RoPE
    keys cost their full-precision token), and --max-overhead-bits keeps a budget's pick under budget + cap."""
    from kvtuner.profile import ProfileSettings, profile_layers

    pairs = ("KV8", "K4V4", "K4V4+sink1+prerope", "KV2", "KV2+sink1+prerope")
    profile = profile_layers(tiny_llama, tiny_ids[0], ProfileSettings(pairs=pairs, group_size=16, split_bits=None))
    plain, sink = profile.candidates.index(LayerSpec("kivi", 4, 4, 16)), [s.label for s in profile.candidates].index(
        "KV4+sink1+prerope")
    # 4 bits + fp16 scale and zero per 16 = 6 bits; one fp16 token of 96 in full precision on top
    assert profile.effective_bits[:, plain] == pytest.approx(6.0)
    assert profile.effective_bits[:, sink] == pytest.approx(6.0 + 16 / 96, rel=1e-6)
    result = run_search(tiny_llama, profile, tiny_ids[0], tiny_ids[1],
                        settings(trials=8, budgets=(4.0,), max_overhead_bits=2.0, reference_check=False), tmp_path)
    for p in result.points + result.uniform:
        assert p.effective_bits == pytest.approx(16 * p.kv_bytes / (2 * 2 * 2 * 96 * 16 * 3))
    pick = result.budgets[0].best
    assert pick.avg_bits <= 4.0 and pick.effective_bits <= 6.0 + 1e-9
    assert any(p.effective_bits > p.avg_bits + 2.0 for p in result.points)  # the cap did bind somewhere
    from kvtuner.search.plots import fronts_figure

    assert fronts_figure({"these": result.to_dict()}, tmp_path / "fronts.png").stat().st_size > 0
