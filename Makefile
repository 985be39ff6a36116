# Two entry points that work on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# optimum-onnx (the Hugging Face ONNX layout's real client) needs transformers < 4.58: its own
# venv, used by tests/test_interop.py only.
OPTIMUM_VENV ?= .venv-optimum
OPTIMUM_STAMP := $(OPTIMUM_VENV)/.installed

.PHONY: setup demo test typecheck clean train-tiny train-tiny-taesd

setup: $(STAMP)

# torch==2.13.0 is pinned first so pip takes the local CPU wheel rather than a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# TensorRT's type stubs go where only mypy looks (mypy_path), never into site-packages:
	# there they leave a `tensorrt` namespace that imports as if TensorRT were installed.
	# Two generated-stub syntax errors are mended: plugin signatures name a parameter `in`,
	# and add_scale_nd puts channel_axis without a default after defaults.
	# (TensorRT itself never installs here: its wheels come from NVIDIA's own index.)
	rm -rf $(VENV)/trt-stubs
	$(PY) -m pip install -q --no-deps --target $(VENV)/trt-stubs tensorrt-stubs==10.13.0.35.1
	sed -i -E -e 's/([(,] *)in: /\1in_: /g' -e 's/, channel_axis: int\)/, channel_axis: int = ...)/' \
	  $(VENV)/trt-stubs/tensorrt_bindings/tensorrt.pyi
	touch $(STAMP)

$(OPTIMUM_STAMP):
	test -x $(OPTIMUM_VENV)/bin/python || python3 -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/python -m pip install -q --upgrade pip
	$(OPTIMUM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(OPTIMUM_VENV)/bin/python -m pip install -q 'optimum-onnx[onnxruntime]==0.1.0' 'transformers<4.58' 'diffusers==0.39.0' scipy
	touch $(OPTIMUM_STAMP)

# img2img on the embedded tiny model: a red circle on blue, prompted with a yellow square on
# green (out/img2img.png), and the same decoded by its TAESD (out/img2img-taesd.png); then
# the seed-style picture, the input and its outputs at growing
# strength (out/demo.png).
demo: $(STAMP)
	$(VENV)/bin/sdtrt img2img --image sdtrt/assets/shapes.png \
	  --prompt "a yellow square on a green background" --strength 0.6 --steps 20 --guidance 3 \
	  --out out/img2img.png
	$(VENV)/bin/sdtrt img2img --image sdtrt/assets/shapes.png \
	  --prompt "a yellow square on a green background" --strength 0.6 --steps 20 --guidance 3 \
	  --vae sdtrt/assets/tiny-taesd --out out/img2img-taesd.png
	$(PY) -m sdtrt.bench.strength --grid out/demo.png

# Train the tiny model's weights from scratch (about 30 minutes on 2 cores; not part of
# demo or test). Writes sdtrt/assets/tiny/ (the default model, `tiny`): the weights, and
# training.json with the arguments, commit and losses.
train-tiny: $(STAMP)
	$(PY) -m sdtrt.train.tiny --out sdtrt/assets/tiny

# A TAESD distilled from the tiny model's VAE (what --vae sdtrt/assets/tiny-taesd runs;
# about 20 minutes on 2 cores).
train-tiny-taesd: $(STAMP)
	$(PY) -m sdtrt.train.taesd --out sdtrt/assets/tiny-taesd

# mypy reads the package under the names it is imported by: setuptools' package-dir makes
# serve/ sdtrt.serve (and export/, engine/... likewise), which mypy cannot follow, so
# without this tree every import of another sdtrt module was unchecked (Any). The tree is
# links: mypy reports the files there, the edits are the tree's own.
MYPY_TREE := $(VENV)/mypy-src/sdtrt
PACKAGE_DIRS := export engine runtime bench serve train

typecheck: $(STAMP)
	rm -rf $(MYPY_TREE) && mkdir -p $(MYPY_TREE)
	for f in sdtrt/*; do ln -s "$(CURDIR)/$$f" $(MYPY_TREE)/; done
	for d in $(PACKAGE_DIRS); do ln -s "$(CURDIR)/$$d" $(MYPY_TREE)/$$d; done
	MYPYPATH=$(VENV)/trt-stubs $(VENV)/bin/mypy $(MYPY_TREE)

test: $(STAMP) $(OPTIMUM_STAMP) typecheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(OPTIMUM_VENV) out
