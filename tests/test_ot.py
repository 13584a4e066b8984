"""Cost matrices and the barycentric map (opt_deus_cli.ot), solvers (opt_deus_cli.solvers)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from opt_deus_cli import ot as odot
from opt_deus_cli import solvers
from opt_deus_cli.errors import OptDeusError, UsageError
from opt_deus_cli.methods.opt_deus.settings import AlignmentSettings
from opt_deus_cli.ot import barycentric_map, cost_matrix, cost_matrix_blocks, cost_spread, permutation_likeness
from opt_deus_cli.solvers import exact_assignment, sinkhorn_reference, solve_plan


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# settings


def test_settings_defaults_and_validation():
    s = AlignmentSettings()
    assert (s.mode, s.solver, s.cost, s.epsilon, s.max_iter, s.tol, s.sketch) == (
        "corrected",
        "exact",
        "sqeuclidean",
        0.05,
        2000,
        1e-4,
        None,
    )
    assert tuple(f.name for f in dataclasses.fields(s)) == (
        "mode",
        "solver",
        "cost",
        "epsilon",
        "max_iter",
        "tol",
        "sketch",
    )
    assert AlignmentSettings(sketch=256).sketch == 256
    assert AlignmentSettings(epsilon=1).epsilon == 1.0 and isinstance(AlignmentSettings(epsilon=1).epsilon, float)
    for bad in (
        dict(mode="paper"),
        dict(solver="emd"),
        dict(cost="l1"),
        dict(epsilon=0),
        dict(epsilon=float("nan")),
        dict(max_iter=0),
        dict(max_iter=2.5),
        dict(tol=-1),
        dict(sketch=0),
        dict(sketch=4),
        dict(sketch=1.5),
    ):
        with pytest.raises(UsageError, match=next(iter(bad))):
            dataclasses.replace(s, **bad)


# ---------------------------------------------------------------------------------------------
# cost matrices


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cost_kinds_match_direct_formulas(dtype):
    X, Y = rand(7, 5, seed=1, dtype=dtype), rand(6, 5, seed=2, dtype=dtype)
    d = torch.cdist(X.double(), Y.double())
    cos = 1 - torch.nn.functional.cosine_similarity(X.double()[:, None], Y.double()[None], dim=2)
    for kind, want in (("euclidean", d), ("sqeuclidean", d**2), ("cosine", cos)):
        got = cost_matrix(X, Y, kind)
        assert got.dtype == dtype and got.shape == (7, 6)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_cost_blocks_equal_the_concatenation_and_tile(monkeypatch):
    monkeypatch.setattr(odot, "_TILE", 4)  # several tiles in both directions
    Xs = [rand(13, 3, seed=3).bfloat16(), rand(5, 13, seed=4).T, rand(13, 1, seed=5)]  # a transposed view too
    Ys = [rand(11, 3, seed=6).bfloat16(), rand(5, 11, seed=7).T, rand(11, 1, seed=8)]
    X, Y = torch.cat([x.float() for x in Xs], 1), torch.cat([y.float() for y in Ys], 1)
    for kind in odot.COST_KINDS:
        torch.testing.assert_close(cost_matrix_blocks(Xs, Ys, kind), cost_matrix(X, Y, kind), atol=1e-5, rtol=1e-5)
    out = torch.full((13, 11), -1.0, dtype=torch.float64)
    assert cost_matrix_blocks(Xs, Ys, "sqeuclidean", out=out) is out
    torch.testing.assert_close(out, cost_matrix(X, Y, "sqeuclidean").double(), atol=1e-5, rtol=1e-5)


def test_cost_rejects_mismatched_blocks_and_kinds():
    with pytest.raises(OptDeusError):
        cost_matrix(rand(3, 4), rand(3, 5), "sqeuclidean")
    with pytest.raises(OptDeusError, match="unknown cost"):
        cost_matrix(rand(3, 4), rand(3, 4), "manhattan")


def test_cost_spread_is_the_rms_of_the_doubly_centred_cost():
    C = rand(7, 5, seed=30, dtype=torch.float64)
    K = C - C.mean(1, keepdim=True) - C.mean(0, keepdim=True) + C.mean()
    assert float(cost_spread(C)) == pytest.approx(float(K.square().mean().sqrt()))
    # adding a constant to a row or a column changes no plan, and not the scale either
    shifted = C + rand(7, 1, seed=31, dtype=torch.float64) * 100 + rand(1, 5, seed=32, dtype=torch.float64) * 100 + 1e3
    assert float(cost_spread(shifted)) == pytest.approx(float(cost_spread(C)))
    assert float(cost_spread(3 * C)) == pytest.approx(3 * float(cost_spread(C)))
    assert float(cost_spread(torch.ones(3, 4) + torch.arange(3.0)[:, None])) == 1.0  # every plan costs the same
    batch = torch.stack([C, 2 * C])
    torch.testing.assert_close(cost_spread(batch), torch.stack([cost_spread(C), 2 * cost_spread(C)]))


def test_cost_spread_of_a_large_cost_in_row_chunks(monkeypatch):
    C = rand(300, 70000, seed=33)  # more rows than one chunk of 2^24 entries holds
    K = C.double() - C.double().mean(1, keepdim=True) - C.double().mean(0, keepdim=True) + C.double().mean()
    assert float(cost_spread(C)) == pytest.approx(float(K.square().mean().sqrt()), rel=1e-9)


def test_batched_cost_equals_cost_matrix_per_pair():
    X, Y = rand(3, 1, 4, 6, seed=34), rand(1, 2, 5, 6, seed=35)
    for kind in odot.COST_KINDS:
        got = odot.batched_cost(X, Y, kind)
        assert got.shape == (3, 2, 4, 5)
        for a in range(3):
            for b in range(2):
                torch.testing.assert_close(got[a, b], cost_matrix(X[a, 0], Y[0, b], kind), atol=1e-5, rtol=1e-5)


def test_sketch_preserves_distances_and_is_the_same_for_both_layers():
    blocks = [rand(50, 300, seed=36).bfloat16(), rand(400, 50, seed=37).T]  # a transposed view too
    S = odot.sketch_features(blocks, 256)
    assert S.shape == (50, 256) and S.dtype == torch.float32
    torch.testing.assert_close(odot.sketch_features(blocks, 256), S)  # one fixed projection
    full = cost_matrix_blocks(blocks, blocks, "sqeuclidean")
    ratio = cost_matrix(S, S, "sqeuclidean")[~torch.eye(50, dtype=torch.bool)] / full[~torch.eye(50, dtype=torch.bool)]
    assert abs(float(ratio.mean()) - 1) < 0.03 and float(ratio.std()) < 0.15  # JL: ~ sqrt(2 / 256) = 0.09


# ---------------------------------------------------------------------------------------------
# solvers


def test_exact_solver_finds_the_planted_permutation():
    X = rand(20, 6, seed=9)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(10))
    Y = X[perm]  # B's unit j is A's unit perm[j]
    T, report = solve_plan(cost_matrix(X, Y, "sqeuclidean"), "exact")
    assert T.dtype == torch.float64 and torch.equal(T.sum(1), torch.full((20,), 1 / 20, dtype=torch.float64))
    assert torch.equal(T.argmax(0), perm)
    assert report.converged and report.solver == "exact" and report.marginal_error == 0.0
    assert permutation_likeness(T) == pytest.approx(1.0)
    torch.testing.assert_close(barycentric_map(T).float() @ X, Y)
    json.dumps(report.as_dict(), allow_nan=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_all_finite(dtype):
    t = rand(50, 40, seed=19).to(dtype)
    assert odot.all_finite(t) and odot.all_finite(t[:, :0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[17, 3] = bad
        assert not odot.all_finite(u) and not odot.all_finite(u.T)


def test_exact_solver_needs_a_square_finite_cost():
    with pytest.raises(OptDeusError, match="square"):
        exact_assignment(torch.rand(3, 4))
    cost = torch.rand(4, 4)
    cost[1, 2] = float("inf")
    with pytest.raises(OptDeusError, match="MLP cost"):
        solve_plan(cost, "exact", what="MLP cost")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_converges_to_a_sharp_plan(dtype):
    X = rand(30, 32, seed=11, dtype=dtype)  # dimension 32: no near neighbours
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(12))
    T, report = solve_plan(cost_matrix(X, X[perm], "sqeuclidean"), "sinkhorn", epsilon=0.01)
    assert T.dtype == dtype and report.converged and report.solver == "sinkhorn" and report.epsilon == 0.01
    assert 1 <= report.iterations < 2000 and report.marginal_error < 1e-5
    assert torch.equal(T.argmax(0), perm) and permutation_likeness(T) > 0.999
    torch.testing.assert_close(barycentric_map(T) @ X, X[perm], atol=1e-5, rtol=0)


def test_sinkhorn_epsilon_is_scale_free():
    cost = torch.rand(12, 10, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    T1, _ = solve_plan(cost, "sinkhorn", epsilon=0.1)
    T2, _ = solve_plan(1000 * cost, "sinkhorn", epsilon=0.1)
    torch.testing.assert_close(T1, T2)
    # a row or column shift (a unit's norm, in a squared-Euclidean cost) changes neither plan nor scale
    T3, _ = solve_plan(cost + 50 * torch.arange(12.0, dtype=torch.float64)[:, None] + 7, "sinkhorn", epsilon=0.1)
    torch.testing.assert_close(T1, T3, atol=1e-5, rtol=0)  # both stopped within tol 1e-6 of the marginals
    assert T1.shape == (12, 10)
    torch.testing.assert_close(T1.sum(0), torch.full((10,), 0.1, dtype=torch.float64), atol=1e-6, rtol=0)


def test_sinkhorn_non_convergence_is_reported():
    cost = torch.rand(40, 40, generator=torch.Generator().manual_seed(14))
    _, report = solve_plan(cost, "sinkhorn", epsilon=1e-3, max_iter=3, tol=1e-12)
    assert not report.converged and report.iterations == 3 and report.marginal_error > 1e-6
    assert any("did not converge" in w for w in report.warnings)


def test_sinkhorn_nan_cost_raises_naming_what():
    cost = torch.rand(5, 5)
    cost[0, 0] = float("nan")
    with pytest.raises(OptDeusError, match="attention KV groups"):
        solve_plan(cost, "sinkhorn", what="attention KV groups")


def test_reference_sinkhorn_underflow_is_not_silent():
    # raw costs of ~100 with reg 0.06: exp(-1600) underflows fp32, the published solver
    # returns an empty plan with only a warning; here it must show in the report
    cost = 100 + torch.rand(6, 6, generator=torch.Generator().manual_seed(15))
    T, report = sinkhorn_reference(cost)
    assert not report.converged and float(T.sum()) < 1e-3 and report.marginal_error > 0.9
    assert report.warnings
    with pytest.raises(OptDeusError, match="no mass"):
        barycentric_map(T)


def test_reference_sinkhorn_is_pots_default_method():
    import ot

    X, Y = rand(9, 4, seed=16), rand(9, 4, seed=17)
    C = cost_matrix(X, Y, "euclidean")
    T, report = sinkhorn_reference(C, max_iter=500)
    a = torch.full((9,), 1 / 9)
    want = ot.sinkhorn(a, a, C, 0.06, numItermax=500, warn=False)
    torch.testing.assert_close(T, want)
    assert T.dtype == torch.float32 and report.solver == "sinkhorn-reference" and report.epsilon == 0.06


def test_unknown_solver():
    with pytest.raises(OptDeusError, match="unknown solver"):
        solve_plan(torch.rand(2, 2), "greedy")


# ---------------------------------------------------------------------------------------------
# the barycentric map


def test_barycentric_map_of_identity_and_permutations():
    n = 6
    torch.testing.assert_close(barycentric_map(torch.eye(n) / n), torch.eye(n))
    perm = torch.tensor([2, 0, 5, 1, 4, 3])
    T = torch.zeros(n, n)
    T[perm, torch.arange(n)] = 1 / n  # A's unit perm[j] goes to B's unit j
    P = barycentric_map(T)
    W = rand(n, 3, seed=18)
    torch.testing.assert_close(P @ W, W[perm])
    assert permutation_likeness(T) == pytest.approx(1.0)
    # scale does not matter (mass lost by an unnormalised plan is corrected)
    torch.testing.assert_close(barycentric_map(T * 1e-3), P)


def test_barycentric_map_of_a_soft_plan():
    T = torch.tensor([[0.25, 0.0, 0.1], [0.05, 0.3, 0.0], [0.0, 0.1, 0.2]])
    P = barycentric_map(T)
    assert P.shape == (3, 3)
    torch.testing.assert_close(P.sum(1), torch.ones(3))
    torch.testing.assert_close(P[0], torch.tensor([0.25, 0.05, 0.0]) / 0.3)
    assert permutation_likeness(torch.full((4, 5), 1 / 20)) == pytest.approx(0.2)


def test_exact_assignment_in_a_child_process_is_the_same(monkeypatch):
    costs = torch.rand(3, 30, 30, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    want = solvers.exact_assignments(costs)
    cols, reports, matched = solvers.exact_assignments_in_background(costs)()
    assert torch.equal(cols, want[0]) and torch.equal(matched, want[2])
    assert all(r.converged and r.solver == "exact" and r.seconds >= 0 for r in reports)

    def broken(dense):
        raise MemoryError("no room")

    monkeypatch.setattr(solvers, "_lap", broken)  # the child inherits it through the fork
    pending = solvers.exact_assignments_in_background(costs, "MLP neurons")
    with pytest.raises(OptDeusError, match=r"MLP neurons: the assignment process failed .*MemoryError: no room"):
        pending()


@pytest.mark.parametrize("background", [False, True])
def test_exact_solver_reduces_rows_and_columns_without_changing_the_optimum_or_the_cost(background):
    """The solver works on the cost minus its row and column minima (faster for LAPJV): it must
    still find the optimum of the cost as given, report matched costs in its units, and hand
    the caller's cost tensor back as it was."""
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(40, 8, generator=g, dtype=torch.float64), torch.randn(40, 8, generator=g, dtype=torch.float64)
    a = a * torch.linspace(0.1, 5.0, 40, dtype=torch.float64)[:, None]  # rows of very different norms
    costs = torch.cdist(a, b)[None] ** 2  # (1, 40, 40) CPU float64: the solver works on it in place
    original = costs.clone()
    solve = solvers.exact_assignments_in_background(costs) if background else (lambda: solvers.exact_assignments(costs))
    cols, _, matched = solve()
    rows, want = linear_sum_assignment(original[0].numpy())
    assert torch.equal(cols[0], torch.from_numpy(want)) and list(rows) == list(range(40))
    assert matched[0].item() == pytest.approx(original[0].numpy()[rows, want].mean(), rel=1e-12)
    torch.testing.assert_close(costs, original, rtol=1e-13, atol=1e-12)
