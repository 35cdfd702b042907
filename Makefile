# ISFE: `make quickstart` trains on the embedded default data, `make test` runs the suite.
# Both create (or reuse) a virtual environment in $(VENV) with every dependency.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/quickstart
DEPS_HASH := $(shell $(PYTHON) -c "import hashlib; print(hashlib.sha256(open('pyproject.toml','rb').read()).hexdigest()[:12])")
DEPS_STAMP := $(VENV)/.isfe-deps-$(DEPS_HASH)

.PHONY: venv test quickstart gallery serve demo bench clean

venv: $(DEPS_STAMP)

$(DEPS_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"]))' > $(VENV)/requirements-isfe.txt
	$(PY) -m pip install --disable-pip-version-check -q -r $(VENV)/requirements-isfe.txt
	rm -f $(VENV)/.isfe-deps-*
	touch $@

test: venv
	$(PY) -m pytest -q

# Train on the embedded default (scikit-learn digits), export to ONNX with a parity
# check (also as the model package $(RUN)/package and its wheel in $(RUN)/dist, next to
# the isfe-model wheel), and index the test images as a gallery for the service and the demo.
quickstart: venv
	rm -rf $(RUN)
	$(PY) -m training --out $(RUN)
	$(PY) -m export --checkpoint $(RUN)/checkpoint.pt --onnx $(RUN)/model.onnx \
		--package $(RUN)/package --name quickstart --version 1 --wheel $(RUN)/dist
	$(PY) -m build --wheel --no-isolation --skip-dependency-check --outdir $(RUN)/dist .
	$(PY) -m training.data --data digits --split test --write-folder $(RUN)/images
	$(PY) -m isfe_model index $(RUN)/model.onnx $(RUN)/images -o $(RUN)/gallery --overwrite

serve: venv
	$(PY) -m serving --model $(RUN)/model.onnx --gallery $(RUN)/gallery

demo: venv
	$(PY) -m demo --model $(RUN)/model.onnx --gallery $(RUN)/gallery

clean:
	rm -rf runs/quickstart .pytest_cache
