# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test test-quick lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch/torchvision pinned to the builds on local disk (an unpinned torch downloads GBs)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/slimgraph optimize torchvision:resnet18 --passes "fold-bn,prune{ratio=0.5},winograd,canonicalize" -o out/resnet18 --force \
		--report out/resnet18.html
	HF_HUB_OFFLINE=1 $(BIN)/python -m examples.minilm_int8 --out out/minilm

test: $(BIN)/.installed
	$(BIN)/ruff check slimgraph tests bench examples
	$(BIN)/python -m pytest -q

test-quick: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not heavy"

bench: $(BIN)/.installed
	$(BIN)/python bench/import_speed.py
	$(BIN)/python bench/transformers.py
	$(BIN)/python bench/compress_transformers.py
	$(BIN)/python bench/decoders.py

clean:
	rm -rf $(VENV) out .pytest_cache
