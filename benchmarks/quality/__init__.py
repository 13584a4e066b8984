"""The quality study: when does OpT-DeUS initialisation pay off? (issue 14)

The shipped examples/tiny-llama (8 layers) is deepened by 50% with every method, and only the new
layers are trained through the tool (`opt_deus_cli.training.train`: transformers' Trainer), on the
base's own pretraining corpus (in-domain) and on C/C++ headers it never saw (new domain); the main
arms also for 600 steps, opt-deus exact at five fusion weights, at four positions, and on a real
model (SmolLM2-135M-Instruct, 4 new layers at the top). Every run is one seed (the data order, the
same for every arm) and one JSON file; reports are rebuilt from the files.

    study    the base models, arms (recipes), regimes' training settings, and the parts
    data     the two corpora as jsonl data files (train, fixed held-out sample)
    runner   up-scale each variant once, train every run not yet saved, one JSON per run
    stats    runs -> tables (regime x budget), spreads, paired differences per seed
    report   the markdown tables
    plot     one figure per regime: loss against step and the paired gap to copy

Up-scaling, training and measuring a run, the statistics and the curves are `opt-deus compare`'s
own code (opt_deus_cli.compare: runner.build_model, runner.train_and_measure, stats, plot), so
the study and the command cannot drift; this package holds the study's parameters (models, arms,
corpora, budgets) and the tables that span several comparisons (budgets, positions, timing).

    python -m benchmarks.quality list                      # the parts, and how many runs are saved
    python -m benchmarks.quality run methods-60            # one part (resumes; about two hours or less)
    python -m benchmarks.quality report                    # tables and figures from the saved runs
    python -m benchmarks.quality run --quick               # smoke run in bench-out/quality-quick, a minute
"""
