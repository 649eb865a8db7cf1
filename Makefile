# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs

.PHONY: demo demo-all test bench venv clean

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# The main job: build the embedded corpus and tokenizers, pretrain the tiny BERT and the tiny XLNet on CPU,
# checkpoint, export both to HF directories.
demo: venv
	$(PY) -m bert_jax.pretrain --config bert_jax/configs/tiny.py --workdir $(WORKDIR)/bert_tiny
	$(PY) -m xlnet_jax.pretrain --config xlnet_jax/configs/tiny.py --workdir $(WORKDIR)/xlnet_tiny

# The two baselines of the comparison as well: the tiny GPT (then a sample from it) and the tiny ELMo biLM.
demo-all: demo
	$(PY) -m gpt_jax.pretrain --config gpt_jax/configs/tiny.py --workdir $(WORKDIR)/gpt_tiny
	$(PY) -m gpt_jax.generate --init $(WORKDIR)/gpt_tiny --prompt "Return the" --max_new_tokens 30
	$(PY) -m elmo_jax.pretrain --config elmo_jax/configs/tiny.py --workdir $(WORKDIR)/elmo_tiny

# loadgroup: tests marked xdist_group (the TFDS end-to-end runs, one group per model) stay on one worker each, so a
# worker's compilation cache serves every run of its group.
test: venv
	$(PY) -m pytest -n 2 --dist loadgroup -q tests

bench: venv
	$(PY) -m benchmarks.bert_pretrain
	$(PY) -m benchmarks.xlnet_pretrain --quick

clean:
	rm -rf $(WORKDIR) .pytest_cache
