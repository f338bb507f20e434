"""The side-by-side benchmark against transformers' LLaVA holding the very same weights: `python -m bench --help`.

One module per section: `machine` (facts, matmul ceiling, quiet-CPU gate, peak memory), `models` (data, processor,
the models compared), `train_step`, `generation`, `data_pipeline`, `bench_packing`, `gguf` (llama.cpp on the GGUF
export against transformers; not a default section), `report` (targets and tables);
`run` ties them together. Results go to `bench/results/`.
"""
