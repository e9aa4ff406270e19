# The two commands a newcomer needs; both set up .venv by themselves (scripts/setup.sh).
.PHONY: setup demo test lint bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/python scripts/demo.py

test: setup
	.venv/bin/python -m pytest -q -ra $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check .

bench: setup
	.venv/bin/python bench/kernels.py --quick
	.venv/bin/python bench/migrate.py --quick
