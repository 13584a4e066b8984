"""The quality study: when does OpT-DeUS initialisation pay off? (issue 14)

The shipped examples/tiny-llama (8 layers) is deepened by 50% with every method, and only the new
layers are trained, on the base's own pretraining corpus (in-domain) and on C/C++ headers it never
saw (new domain); the main arms also for 600 steps, opt-deus exact at five fusion weights, at four
positions, and on a real model (SmolLM2-135M-Instruct, 4 new layers at the top). A seed fixes the
data order, the same for every arm.

The study is a user of `opt-deus compare` (issue 22): each budget (model x domain x layers
trained x steps) is one comparison, built as a CompareSpec and run by compare's `run_comparison`,
reported by compare's `write_report`, in compare's layout under benchmarks/results/quality/
MODEL/DOMAIN/KIND/ (comparison.json, runs/VARIANT/seedS.json, report.md, report.json, PNGs). This
package holds only the study's parts:

    study    the base models, arms (recipes), budgets' training options, and the parts
    data     the two corpora as jsonl data files (train, fixed held-out sample)
    run      a part as CompareSpecs through run_comparison (two seeds side by side), reports
    summary  the tables across comparisons (gaps to copy per budget, step time new vs all layers)
    migrate  the one-off move of the 2026-11-25 runs (pre-compare layout) into compare's layout

    python -m benchmarks.quality list                      # the parts, and how many runs are saved
    python -m benchmarks.quality run methods-60            # one part (resumes; about two hours or less)
    python -m benchmarks.quality report                    # compare's reports and summary.md
    python -m benchmarks.quality run --quick               # smoke run in bench-out/quality-quick, a minute
"""
