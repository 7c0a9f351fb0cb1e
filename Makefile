# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench realworld examples clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[torch,dev,tvm]"
	touch $(STAMP)

demo: $(STAMP)  ## compile the bundled digits CNN for this machine's AVX512-VNNI target
	$(BIN)/edgeq compile examples/digits_cnn/model.onnx -t x86-avx512-vnni \
		--calib examples/digits_cnn/calib.npz --eval examples/digits_cnn/eval.npz \
		--metric examples/metric.py:accuracy --max-drop 0.3% -o build/digits_cnn

test: $(STAMP)  ## the whole test suite (what CI runs)
	$(BIN)/python -m pytest -n 2 -q

bench: $(STAMP)  ## edgeq vs ONNX Runtime's quantize_static on the model zoo
	$(BIN)/python benchmarks/vs_ort_quantizer.py

realworld: $(STAMP)  ## edgeq vs ONNX Runtime's quantizer on the real-model corpus: make realworld CORPUS=DIR
	$(BIN)/python benchmarks/realworld.py --corpus $(CORPUS)

examples: $(STAMP)  ## retrain and re-export the example models
	$(BIN)/python examples/build_examples.py

clean:
	rm -rf build $(VENV)
