"""Balancer classes (marble_pl.balancers): weights on known Grams, validation, specs, the config."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from marble_pl.balance import (
    BalanceResult,
    MinNormSolver,
    gradient_scales,
    rescale_gram,
    to_raw_weights,
)
from marble_pl.balancers import (
    Balancer,
    GramianWeighting,
    MinNormBalancer,
    SingleReward,
    WeightedSum,
    resolve_balancer,
)
from marble_pl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
NAMES3 = ["brightness", "saturation", "compressibility"]


def _has_torchjd() -> bool:
    try:
        import torchjd.aggregation  # noqa: F401
    except ImportError:
        return False
    return True


needs_torchjd = pytest.mark.skipif(not _has_torchjd(), reason='needs "marble-pl[balancers]"')


def _gram(seed: int, k: int = 3, p: int | None = None, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(k, p or 2 * k)) * scale
    return g @ g.T


def _conflicting_gram(seed: int, k: int = 4, scale: float = 1.0) -> np.ndarray:
    """A Gram where g_1 ~ -2 g_0: the mean direction pushes reward 0 backwards."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(k, 6))
    g[1] = -2.0 * g[0] + 0.3 * rng.normal(size=6)
    g *= scale
    return g @ g.T


def _bound(balancer: Balancer, k: int = 3) -> Balancer:
    balancer.bind([f"r{i}" for i in range(k)])
    return balancer


# ------------------------------------------------------------------ MinNormBalancer


@pytest.mark.parametrize("normalization", ["none", "l2", "loss"])
@pytest.mark.parametrize("seed", range(4))
def test_min_norm_is_the_solver_on_the_rescaled_gram_mapped_to_raw_weights(normalization, seed):
    m = _gram(seed, k=4, scale=10.0 ** (seed - 3))
    losses = np.random.default_rng(seed).uniform(0.1, 3.0, size=4)
    result = _bound(MinNormBalancer(normalization), 4)(m, losses)

    scales = gradient_scales(m, normalization, losses)
    expected = MinNormSolver()(rescale_gram(m, scales))
    np.testing.assert_allclose(result.weights, to_raw_weights(expected.weights, scales), atol=1e-12)
    assert (
        (result.status, result.fallback)
        == (expected.status, expected.fallback)
        == ("solved", False)
    )
    assert abs(result.weights.sum() - 1.0) < 1e-12 and np.all(result.weights >= 0)


def test_min_norm_takes_torch_tensors_as_the_module_hands_them():
    m, losses = _gram(3), np.array([0.5, 1.0, 2.0])
    a = _bound(MinNormBalancer("loss"))(m, losses).weights
    b = _bound(MinNormBalancer("loss"))(torch.from_numpy(m), torch.from_numpy(losses)).weights
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("norm", [1.0, 1e-5])
def test_min_norm_of_two_opposed_gradients_is_the_midpoint(norm):
    m = norm**2 * np.array([[1.0, -1.0], [-1.0, 1.0]])  # g_2 = -g_1, same norm: d = 0 at 1/2
    result = _bound(MinNormBalancer(), 2)(m)
    np.testing.assert_allclose(result.weights, [0.5, 0.5], atol=1e-9)
    assert (result.status, result.fallback) == ("solved", False)  # a QP answer, not a fallback
    assert result.weights @ m @ result.weights <= 1e-12 * norm**2  # d = 0


def test_min_norm_l2_balances_unequal_norms_like_unit_gradients():
    # g_1 = 2 e, g_2 = -e. Raw: 2 l1 = l2 -> (1/3, 2/3). l2: unit gradients meet at (1/2, 1/2),
    # i.e. raw weights (1/2)/2 : (1/2)/1 -> (1/3, 2/3) again; both directions are 0.
    m = np.array([[4.0, -2.0], [-2.0, 1.0]])
    np.testing.assert_allclose(_bound(MinNormBalancer(), 2)(m).weights, [1 / 3, 2 / 3], atol=1e-9)
    # Orthogonal gradients with norms 1 and 3: raw min-norm leans on the small one (9:1);
    # l2 gives unit gradients equal weight, i.e. raw weights 1/1 : 1/3 -> (3/4, 1/4).
    m = np.diag([1.0, 9.0])
    np.testing.assert_allclose(_bound(MinNormBalancer(), 2)(m).weights, [0.9, 0.1], atol=1e-9)
    np.testing.assert_allclose(_bound(MinNormBalancer("l2"), 2)(m).weights, [0.75, 0.25], atol=1e-9)


def test_min_norm_loss_normalization_divides_by_the_losses():
    # Orthogonal unit gradients, losses L = (1, 4): the QP on g_k / L_k weights them L_k^2, i.e.
    # raw weights L_k^2 / L_k = L_k -> (1/5, 4/5), the larger loss pushed more (MGDA-UB).
    m = np.eye(2)
    result = _bound(MinNormBalancer("loss"), 2)(m, np.array([1.0, 4.0]))
    np.testing.assert_allclose(result.weights, [0.2, 0.8], atol=1e-9)
    np.testing.assert_allclose(_bound(MinNormBalancer(), 2)(m).weights, [0.5, 0.5], atol=1e-9)
    with pytest.raises(ValueError, match="losses"):
        _bound(MinNormBalancer("loss"), 2)(m)


def test_min_norm_rejects_an_unknown_normalization():
    with pytest.raises(ConfigError, match="normalization='L2'.*'l2'"):
        MinNormBalancer("L2")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("m", "status"),
    [(np.zeros((3, 3)), "zero_gram"), (np.diag([1.0, np.nan, 1.0]), "nonfinite_gram")],
)
def test_min_norm_degenerate_gram_gives_uniform_weights_and_keeps_the_warm_start(m, status):
    b = _bound(MinNormBalancer())
    b(_gram(0))
    kept = b.warm_start
    result = b(m)
    np.testing.assert_array_equal(result.weights, np.full(3, 1 / 3))
    assert (result.status, result.fallback) == (status, False)
    np.testing.assert_array_equal(b.warm_start, kept)


def test_gram_of_the_wrong_size_is_refused_once_bound():
    with pytest.raises(ValueError, match="3 rewards"):
        _bound(MinNormBalancer())(np.eye(2))


def test_min_norm_warm_start_round_trips_through_state_dict():
    a = _bound(MinNormBalancer("l2"))
    assert a.warm_start is None and a.state_dict() == {"warm_start": None}
    a(_gram(1))
    state = json.loads(json.dumps(a.state_dict()))  # plain data, as a checkpoint holds it
    np.testing.assert_array_equal(state["warm_start"], a.solver.last_weights)

    b = _bound(MinNormBalancer("l2"))
    b.load_state_dict(state)
    np.testing.assert_array_equal(b.warm_start, a.warm_start)
    np.testing.assert_array_equal(b.solver.last_weights, a.solver.last_weights)
    nxt = _gram(2)
    np.testing.assert_array_equal(a(nxt).weights, b(nxt).weights)  # exact resume: same bits
    b.warm_start = None
    assert b.solver.last_weights is None


# ------------------------------------------------------------------ mixing baselines


def test_weighted_sum_mixes_normalised_weights_and_logs_them():
    b = _bound(WeightedSum([1.0, 2.0, 1.0]))
    assert not WeightedSum.needs_gram
    np.testing.assert_allclose(b.mix(), [0.25, 0.5, 0.25])
    np.testing.assert_allclose(b.effective_weights(np.ones(1)), [0.25, 0.5, 0.25])
    np.testing.assert_allclose(b(np.eye(3)).weights, [0.25, 0.5, 0.25])
    np.testing.assert_allclose(_bound(WeightedSum(), 4).mix(), np.full(4, 0.25))


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0, 2.0], r"has 2 entries for 3 rewards \['brightness', .*one weight per reward"),
        ([1.0, -1.0, 1.0], "non-negative"),
        ([0.0, 0.0, 0.0], "positive sum"),
        ([1.0, float("nan"), 1.0], "finite"),
    ],
    ids=["count", "negative", "zero_sum", "nan"],
)
def test_weighted_sum_validates_its_weights_at_bind(weights, match):
    b = WeightedSum(weights)
    with pytest.raises(ConfigError, match="model.balancer.init_args.weights"):
        b.bind(NAMES3)
    with pytest.raises(ConfigError, match=match):
        WeightedSum(weights).bind(NAMES3)


def test_single_reward_mixes_a_one_hot_and_checks_its_index():
    b = SingleReward(1)
    b.bind(NAMES3)
    assert not SingleReward.needs_gram
    np.testing.assert_array_equal(b.mix(), [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(b.effective_weights(np.ones(1)), [0.0, 1.0, 0.0])
    for bad in (3, -1):
        with pytest.raises(ConfigError, match=r"index=.* out of range .*index from 0 to 2"):
            SingleReward(bad).bind(NAMES3)


def test_gram_balancers_do_not_mix_and_log_their_own_weights():
    b = _bound(MinNormBalancer())
    assert MinNormBalancer.needs_gram and b.mix() is None
    np.testing.assert_array_equal(b.effective_weights(np.array([0.2, 0.3, 0.5])), [0.2, 0.3, 0.5])


def test_mix_before_bind_is_a_programming_error():
    with pytest.raises(RuntimeError, match="bind"):
        WeightedSum().mix()
    with pytest.raises(ConfigError, match="model.rewards is empty"):
        MinNormBalancer().bind([])


# ------------------------------------------------------------------ resolve_balancer and specs


def test_resolve_maps_the_old_names_with_their_old_settings():
    b = resolve_balancer("marble", normalization="l2")
    assert isinstance(b, MinNormBalancer) and b.normalization == "l2"
    b = resolve_balancer("weighted_sum", reward_weights=[1.0, 3.0], single_reward=1)
    assert isinstance(b, WeightedSum) and b.weights == [1.0, 3.0]
    with pytest.raises(ConfigError, match=r"model.reward_weights has 2 entries for 3 rewards"):
        b.bind(NAMES3)
    b = resolve_balancer("single", reward_weights=[1.0, 3.0], single_reward=1)
    assert isinstance(b, SingleReward) and b.index == 1
    with pytest.raises(ConfigError, match=r"model.single_reward=1 is out of range"):
        b.bind(["brightness"])


def test_resolve_instantiates_class_paths_and_passes_balancers_through():
    full = {"class_path": "marble_pl.balancers.WeightedSum", "init_args": {"weights": [1, 3]}}
    short = {"class_path": "SingleReward", "init_args": {"index": 2}}
    b = resolve_balancer(full)
    assert isinstance(b, WeightedSum) and b.weights == [1.0, 3.0]
    assert resolve_balancer(short).index == 2  # type: ignore[attr-defined]
    assert isinstance(resolve_balancer({"class_path": "MinNormBalancer"}), MinNormBalancer)
    same = MinNormBalancer()
    assert resolve_balancer(same) is same


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("marbel", "unknown model.balancer 'marbel'. Did you mean 'marble'"),
        ("sum", r"model.balancer 'sum'. Use one of \['marble', 'weighted_sum', 'single'\] or a cl"),
        ({"class_path": "WeightSum"}, "Did you mean 'WeightedSum'"),
        ({"class_path": "marble_pl.balancers.Nope"}, "cannot be imported"),
        ({"class_path": "marble_pl.balance.EMA"}, "not a marble_pl.balancers.Balancer subclass"),
        ({"class_path": "WeightedSum", "init_args": {"weight": [1]}}, "takes \\['weights'\\]"),
        ({"class_path": "WeightedSum", "args": {}}, "unexpected keys \\['args'\\]"),
        ({"name": "marble"}, "neither a name"),
        (3, "neither a name"),
    ],
    ids=[
        "typo",
        "unknown_name",
        "short_typo",
        "not_importable",
        "not_a_balancer",
        "bad_init_args",
        "extra_keys",
        "no_class_path",
        "not_a_spec",
    ],
)
def test_resolve_errors_name_the_problem_and_the_fix(spec, match):
    with pytest.raises(ConfigError, match=match):
        resolve_balancer(spec)


def _behaviour(b: Balancer, m: np.ndarray, losses: np.ndarray) -> np.ndarray:
    b.bind(NAMES3)
    return b.mix() if not b.needs_gram else b(m, losses).weights  # type: ignore[return-value]


ROUND_TRIP_CASES = [
    pytest.param(lambda: MinNormBalancer("loss", eps_abs=1e-8, max_iter=500), id="min_norm"),
    pytest.param(lambda: WeightedSum([3, 1, 1]), id="weighted_sum"),
    pytest.param(lambda: WeightedSum(), id="weighted_sum_uniform"),
    pytest.param(lambda: SingleReward(2), id="single"),
    pytest.param(
        lambda: GramianWeighting("UPGradWeighting", {"pref_vector": [0.2, 0.3, 0.5]}),
        id="upgrad_pref",
        marks=needs_torchjd,
    ),
    pytest.param(
        lambda: GramianWeighting("MGDA", {"epsilon": 1e-6}), id="mgda", marks=needs_torchjd
    ),
]


@pytest.mark.parametrize("make", ROUND_TRIP_CASES)
def test_spec_round_trips_to_an_equal_behaving_balancer(make):
    balancer = make()
    spec = balancer.spec()
    assert json.loads(json.dumps(spec)) == spec  # plain data for hparams and checkpoints
    copy = resolve_balancer(spec)
    assert type(copy) is type(balancer) and copy.spec() == spec
    m, losses = _conflicting_gram(5, k=3), np.array([1.0, 2.0, 0.5])
    np.testing.assert_array_equal(_behaviour(copy, m, losses), _behaviour(balancer, m, losses))


class _HalfHalf(Balancer):
    """A user's own balancer defined outside marble_pl: the interface is all the module uses."""

    def __init__(self, bias: float = 0.0) -> None:
        self.bias = bias

    def __call__(self, gram: Any, losses: Any = None) -> BalanceResult:
        w = np.full(len(gram), 1.0 / len(gram))
        w[0] += self.bias
        return BalanceResult(w / w.sum(), "custom", 0.0, False)


def test_a_user_subclass_round_trips_by_its_own_class_path():
    spec = _HalfHalf(0.5).spec()
    assert spec == {"class_path": f"{__name__}._HalfHalf", "init_args": {"bias": 0.5}}
    b = resolve_balancer(spec)
    assert isinstance(b, _HalfHalf) and b.needs_gram
    np.testing.assert_allclose(b(np.eye(2)).weights, [2 / 3, 1 / 3])


def test_jsonargparse_builds_a_balancer_from_its_class_path():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--balancer", type=Balancer)
    value = {"class_path": "marble_pl.balancers.WeightedSum", "init_args": {"weights": [1, 2]}}
    cfg = parser.parse_args(["--balancer", json.dumps(value)])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    b = instantiate(cfg).balancer
    assert isinstance(b, WeightedSum) and b.weights == [1.0, 2.0]
    b.bind(["a", "b"])
    np.testing.assert_allclose(b.mix(), [1 / 3, 2 / 3])

    class Module:  # as LightningCLI sees MarbleModule: a name or a class, from YAML
        def __init__(self, balancer: Balancer | str = "marble") -> None:
            self.balancer = balancer

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Module, "model")
    yaml = "model:\n  balancer:\n    class_path: SingleReward\n    init_args: {index: 1}\n"
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    built = instantiate(parser.parse_string(yaml)).model.balancer
    assert isinstance(built, SingleReward) and built.index == 1
    assert instantiate(parser.parse_string("model: {balancer: marble}")).model.balancer == "marble"
    bad = "model: {balancer: {class_path: MinNormBalancer, init_args: {normalization: l3}}}"
    with pytest.raises(Exception, match="normalization"):
        parser.parse_string(bad)


# ------------------------------------------------------------------ torchjd adapter


# The weightings the balancers extra must make work (FairGrad needs its `alpha`).
EXTRA_WEIGHTINGS = {
    "UPGrad": {},
    "MGDA": {},
    "DualProj": {},
    "PCGrad": {},
    "IMTLG": {},
    "AlignedMTL": {},
    "FairGrad": {"alpha": 1.0},
}


def _torchjd_direct(name: str, init_args: dict[str, Any], m: np.ndarray) -> np.ndarray:
    """torchjd's own weights on the same Gram (divided by its mean diagonal), then normalised."""
    import torchjd.aggregation as agg

    weighting = getattr(agg, f"{name}Weighting")(**init_args)
    torch.manual_seed(0)  # PCGrad projects in a random order (torch's global generator)
    w = weighting(torch.from_numpy(m / (np.trace(m) / len(m)))).numpy()
    return w / w.sum()


@needs_torchjd
@pytest.mark.parametrize("name", sorted(EXTRA_WEIGHTINGS))
@pytest.mark.parametrize("seed", range(3))
def test_gramian_weighting_is_torchjd_normalised_to_sum_one(name, seed):
    m = _conflicting_gram(seed, scale=10.0 ** (-seed))
    balancer = _bound(GramianWeighting(name, EXTRA_WEIGHTINGS[name]), 4)
    torch.manual_seed(0)
    result = balancer(m)
    assert (result.status, result.fallback) == (f"torchjd:{name}", False)
    assert abs(result.weights.sum() - 1.0) < 1e-12
    np.testing.assert_allclose(
        result.weights, _torchjd_direct(name, EXTRA_WEIGHTINGS[name], m), atol=1e-10
    )


@needs_torchjd
def test_upgrad_and_mgda_weights_lie_on_the_simplex():
    for name in ("UPGrad", "MGDA"):
        for seed in range(10):
            w = _bound(GramianWeighting(name), 5)(_gram(seed, k=5, p=3)).weights
            assert np.all(w >= -1e-12) and abs(w.sum() - 1.0) < 1e-12, (name, seed, w)


@needs_torchjd
def test_gramian_weighting_is_blind_to_the_gram_scale():
    # Raw LoRA Grams are tiny; torchjd's projector treats a trace < 1e-4 as a zero Gram (UPGrad
    # then returns the plain mean). Dividing by the mean diagonal first avoids that.
    j = np.array([[1.0, 0.0], [-0.5, 1.0]])
    m = j @ j.T
    ref = _bound(GramianWeighting("UPGrad"), 2)(m).weights
    assert abs(ref[0] - ref[1]) > 0.01  # conflicting gradients: not the mean
    for scale in (1e-6, 1e-12):
        np.testing.assert_allclose(
            _bound(GramianWeighting("UPGrad"), 2)(m * scale).weights, ref, rtol=1e-9
        )


@needs_torchjd
def test_torchjd_mgda_agrees_with_the_min_norm_qp_to_its_frank_wolfe_accuracy():
    # torchjd's MGDA is plain Frank-Wolfe (epsilon 1e-3, 100 iterations by default). On these 20
    # full-rank Grams its weights differ from the OSQP solution by up to 0.044 with the defaults
    # (0.16 over 300 random ones) and 4.8e-3 with epsilon 1e-7 / 2000 iterations; the QP's
    # objective lambda^T M lambda is never worse.
    tight = {"epsilon": 1e-7, "max_iters": 2000}
    worst_default = worst_tight = 0.0
    for seed in range(20):
        k = 2 + seed % 5
        m = _gram(seed, k=k, p=2 * k, scale=10.0 ** (seed % 7 - 5))
        qp = _bound(MinNormBalancer(), k)(m).weights
        fw = _bound(GramianWeighting("MGDA"), k)(m).weights
        fw_tight = _bound(GramianWeighting("MGDA", tight), k)(m).weights
        scale = np.trace(m) / k
        assert qp @ m @ qp <= fw @ m @ fw + 1e-9 * scale
        assert qp @ m @ qp <= fw_tight @ m @ fw_tight + 1e-9 * scale
        worst_default = max(worst_default, float(np.abs(qp - fw).max()))
        worst_tight = max(worst_tight, float(np.abs(qp - fw_tight).max()))
    assert worst_tight < 1e-2 and worst_default < 0.1
    # Two gradients: the min-norm point has a closed form that both reach.
    m = np.array([[1.0, 0.2], [0.2, 4.0]])
    for b in (MinNormBalancer(), GramianWeighting("MGDA", tight)):
        np.testing.assert_allclose(_bound(b, 2)(m).weights, [3.8 / 4.6, 0.8 / 4.6], atol=1e-6)


@needs_torchjd
@pytest.mark.parametrize("name", ["UPGrad", "upgrad", "UPGradWeighting", "UP-Grad"])
def test_gramian_weighting_accepts_the_name_with_or_without_suffix(name):
    import torchjd.aggregation as agg

    b = _bound(GramianWeighting(name))
    assert b.name == "UPGrad" and type(b._weighting) is agg.UPGradWeighting


@needs_torchjd
@pytest.mark.parametrize(
    ("name", "init_args", "match"),
    [
        ("UPGard", None, r"unknown torchjd weighting 'UPGard'.*Did you mean 'UPGrad'.*Available"),
        ("upgard", None, "Did you mean 'UPGrad'"),
        ("Mean", None, "needs the Jacobian, not the Gram.*WeightedSum"),
        ("MGDA", {"eps": 1e-3}, r"no argument \['eps'\].*\['epsilon', 'max_iters'\]"),
        ("MGDA", {"epsilon": -1.0}, "epsilon must be positive"),
        ("FairGrad", None, "FairGradWeighting.*alpha"),
    ],
    ids=["typo", "typo_lower", "jacobian_only", "unknown_arg", "bad_value", "missing_arg"],
)
def test_gramian_weighting_config_errors(name, init_args, match):
    with pytest.raises(ConfigError, match=match):
        GramianWeighting(name, init_args)


@needs_torchjd
def test_tensor_arguments_come_from_lists_and_are_checked_at_bind():
    b = GramianWeighting("UPGrad", {"pref_vector": [1.0, 0.0, 0.0]})
    assert isinstance(b._weighting.pref_vector, torch.Tensor)
    _bound(b)
    with pytest.raises(ConfigError, match="fails on 2 rewards"):
        GramianWeighting("UPGrad", {"pref_vector": [1.0, 0.0, 0.0]}).bind(["a", "b"])


@needs_torchjd
@pytest.mark.parametrize(
    ("weights", "why"),
    [
        (torch.tensor([-1.0, 0.5], dtype=torch.float64), "sum to -0.5 (not > 0)"),
        (torch.tensor([np.nan, 0.5], dtype=torch.float64), "sum to nan"),
        (RuntimeError("quadprog failed"), "error: RuntimeError: quadprog failed"),
    ],
    ids=["negative_sum", "nan", "error"],
)
def test_gramian_weighting_falls_back_to_uniform_saying_why(weights, why):
    b = _bound(GramianWeighting("UPGrad"), 2)

    def fake(gram: torch.Tensor) -> torch.Tensor:
        if isinstance(weights, Exception):
            raise weights
        return weights

    b._weighting = fake
    result = b(np.eye(2))
    np.testing.assert_array_equal(result.weights, [0.5, 0.5])
    assert result.fallback and result.status.startswith("torchjd:UPGrad: ") and why in result.status


@needs_torchjd
def test_negative_weights_are_kept_after_normalising():
    b = _bound(GramianWeighting("UPGrad"), 2)
    b._weighting = lambda gram: torch.tensor([-0.5, 1.5], dtype=torch.float64)
    result = b(np.eye(2))
    np.testing.assert_allclose(result.weights, [-0.5, 1.5])
    assert not result.fallback


@needs_torchjd
def test_gramian_weighting_state_dict_and_stateful_reset():
    m = _gram(4)
    a = _bound(GramianWeighting("GradVac"))
    first = a(m).weights
    assert not np.allclose(a(m).weights, first)  # GradVac's moving averages moved
    np.testing.assert_array_equal(a.state_dict()["warm_start"], a.warm_start)
    b = _bound(GramianWeighting("GradVac"))
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(b.warm_start, a.warm_start)
    a.load_state_dict(a.state_dict())  # a resume restarts the averages
    np.testing.assert_array_equal(a(m).weights, first)


def test_missing_torchjd_says_which_extra_to_install(monkeypatch):
    for mod in [m for m in sys.modules if m == "torchjd" or m.startswith("torchjd.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "torchjd", None)  # `import torchjd` now raises ImportError
    with pytest.raises(
        ConfigError, match=r'torchjd, which is not installed.*"marble-pl\[balancers\]"'
    ):
        GramianWeighting("UPGrad")
    with pytest.raises(ConfigError, match="marble-pl"):
        resolve_balancer({"class_path": "GramianWeighting", "init_args": {"weighting": "MGDA"}})


@needs_torchjd
def test_cagrad_without_cvxpy_names_the_missing_packages():
    try:
        import cvxpy  # noqa: F401

        pytest.skip("cvxpy is installed: CAGrad works")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"balancers extra does not install.*cvxpy"):
        GramianWeighting("CAGrad", {"c": 0.5})


def test_the_balancers_extra_is_declared_and_installed_by_ci():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    names = {req.split(">")[0].split("=")[0].split("!")[0].strip() for req in extras["balancers"]}
    assert {"torchjd", "quadprog", "qpsolvers"} <= names and "torch" not in names
    # CI runs the README's test command, whose `.[test]` carries the balancers' packages
    for requirement in extras["balancers"]:
        assert requirement in extras["test"], requirement
    assert 'pip install -e ".[test]"' in (ROOT / "README.md").read_text()
