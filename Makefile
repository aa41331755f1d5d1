# Two entry points: `make demo` (set up, then QLoRA on the built-in demo) and `make test`.
.PHONY: demo test setup setup-test bench

demo:
	@bash scripts/setup.sh
	.venv/bin/python -m demo --method qlora --output-dir runs/demo --overwrite

test:
	@bash scripts/setup.sh test
	.venv/bin/python -m pytest

bench:
	@bash scripts/setup.sh test
	.venv/bin/python -m benchmarks.methods
