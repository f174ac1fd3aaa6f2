# Two commands on a fresh clone (Python 3.11 + pip): `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: here it resolves to the CPU wheel on local disk, so no CUDA build is pulled
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[train,test]'
	# medkd[nnunet] (nnU-Net teachers) without its timm -> torchvision chain: torchvision from PyPI is broken beside
	# the CPU torch wheel and breaks `import monai`; the U-Nets medkd builds need neither
	$(PY) -m pip install --quiet --no-deps dynamic-network-architectures==0.4.4 einops
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/medkd demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .cache demo_runs runs
