"""The method contract (issue 19): check() and prepare() take the resolved job typed as
methods.base.JobView (job.Job is one), and check() keeps nothing in the method that build()
depends on: what it decides comes back as Decisions, which the pipeline hands to build() in
every BuildContext."""

from __future__ import annotations

import copy

import torch

from conftest import LAYOUT, SUPPORTED, planted_permutation, random_block
from opt_deus_cli.block import BuildContext, Decisions
from opt_deus_cli.job import Options, resolve_job
from opt_deus_cli.methods.base import JobView, Method
from opt_deus_cli.methods.opt_deus import OptDeusMethod
from opt_deus_cli.methods.opt_deus.memory import layer_memory
from opt_deus_cli.methods.registry import method_class, method_names
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.source import SourceModel

RECIPES = {
    "copy": {"method": "copy", "count": 1},
    "stack": {"method": "stack", "overlap": 1},
    "lesa": {"method": "lesa", "count": 1, "lesa": {"steps": 2}},
    "average": {"method": "average", "count": 1},
    "opt-deus": {"method": "opt-deus", "count": 1},
}


def test_check_decides_without_keeping_state(model_factory):
    """For every registered method: check() returns Decisions and leaves the method as it found it;
    the job carries the decision. OpT-DeUS under a budget below twice a layer's need decides to
    solve in order, with room to spare beside attention; the method object is the same either way."""
    assert set(RECIPES) == set(method_names())
    source = SourceModel.open(model_factory("llama", layers=4))
    for name, data in RECIPES.items():
        recipe = parse_recipe(data, source=name)
        job = resolve_job(source, recipe, Options(device="cpu"))
        assert isinstance(job.method, method_class(name)) and isinstance(job.decisions, Decisions)
        before = copy.deepcopy(vars(job.method))
        assert isinstance(job.method.check(job), Decisions)
        assert vars(job.method) == before, name
    recipe = parse_recipe({"method": "opt-deus", "positions": "top", "count": 2})
    need = layer_memory(resolve_job(source, recipe, Options(device="cpu")), "exact").cpu_total
    for factor, overlap in ((1.5, False), (2.5, True)):
        job = resolve_job(source, recipe, Options(device="cpu", memory_budget=str(int(factor * need))))
        method: Method = job.method
        before = copy.deepcopy(vars(method))
        assert job.decisions == Decisions(overlap=overlap) == method.check(job)
        assert vars(method) == before


def test_the_overlap_decision_travels_in_the_context(monkeypatch):
    """One method object builds in order or overlapped as each context says (never as a previous
    check left it), and both give the same layer."""
    from opt_deus_cli.methods.opt_deus import corrected

    monkeypatch.setattr(corrected, "OVERLAP_MIN_NEURONS", 0)  # this small layer counted as large: it may overlap
    method = OptDeusMethod()
    lower = random_block("llama", seed=1)
    upper = planted_permutation(random_block("llama", seed=2), "llama", seed=3)
    built = {}
    for overlap in (True, False, True):
        ctx = BuildContext(SUPPORTED["llama"], LAYOUT, torch.device("cpu"), (0, 1), None, Decisions(overlap=overlap))
        block, report = method.build(lower, upper, ctx)
        assert report["mlp"]["overlapped"] is overlap
        built.setdefault(overlap, block)
    assert built[True].keys() == built[False].keys()
    assert all(torch.equal(built[True][n], built[False][n]) for n in built[True])


def test_job_is_a_job_view():
    """The members JobView names are what job.Job provides (mypy checks the types in `make lint`)."""
    from opt_deus_cli.job import Job

    members = {name for name in vars(JobView) if not name.startswith("_")}
    assert members == {"source", "recipe", "layers", "base_layers", "dtype", "device", "memory_budget"}
    fields = set(Job.__dataclass_fields__) | {name for name, v in vars(Job).items() if isinstance(v, property)}
    assert members <= fields
