"""`dvos bench`: speed, memory, FLOPs, data loading and J&F-vs-FPS measurements (the top layer,
beside `dvos.cli`: it drives models, the inference engine, the data modules and the training step).

    dense.py     the dense-memory baseline (the student with global attention over a growing memory)
    measure.py   instruments: matmul rate, FLOP counts, peak memory, clocks
    cells.py     one model on one generated video, in a fresh process: FPS and peak memory
    workload.py  data loading clips/s against the training step's consumption
    accuracy.py  J&F and FPS through the evaluation path of `dvos evaluate`
    runner.py    every section in one run → results.json;  report.py / plot.py  the table and the PNG
"""
