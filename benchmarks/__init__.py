"""Benchmarks: each step measured against what a user would otherwise run, as ratios in one run.

    make bench          # all five, then docs/benchmarks.md from benchmarks/results/*.json
    make bench-smoke    # the same code on tiny sizes (a minute or two), results under build/bench/smoke

Each module is `python -m benchmarks.<name> [--smoke]`: merge, data, train, serve, images. They write
`<results dir>/<name>.json`; `python -m benchmarks.report` turns those files into the report. Figures are
never typed by hand.
"""
