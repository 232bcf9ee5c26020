#!/usr/bin/env bash
# Install the pinned agent CLIs into a cache outside the clone, keyed by the pins, and print
# the directory that links them (FLOW_CLI_PATH for the tests). Safe to run again: a warm
# cache is only checked.
set -euo pipefail
NPM_PINS="opencode-ai@1.18.33 @anthropic-ai/claude-code@2.1.197 @openai/codex@0.171.0"
AIDER_PIN="aider-chat==0.86.2"
CACHE="${FLOW_CI_CACHE:-/var/cache/flow-ci}"
key() { printf '%s' "$1" | sha256sum | cut -c1-12; }
npm_dir="$CACHE/npm-$(key "$NPM_PINS")"
aider_dir="$CACHE/aider-$(key "$AIDER_PIN")"
mkdir -p "$CACHE"
if [ ! -f "$npm_dir/.done" ]; then
  rm -rf "$npm_dir"
  # shellcheck disable=SC2086
  npm install --silent --no-audit --no-fund --prefix "$npm_dir" $NPM_PINS >&2
  touch "$npm_dir/.done"
fi
if [ ! -f "$aider_dir/.done" ]; then
  rm -rf "$aider_dir"
  python3 -m venv "$aider_dir"
  "$aider_dir/bin/pip" install -q --disable-pip-version-check "$AIDER_PIN" >"$aider_dir.log" 2>&1 \
    || { cat "$aider_dir.log" >&2; exit 1; }
  touch "$aider_dir/.done"
fi
# One directory of links, so the aider venv's own python never shadows the project's.
bin="$CACHE/bin-$(key "$NPM_PINS $AIDER_PIN")"
mkdir -p "$bin"
for name in opencode claude codex; do ln -sfn "$npm_dir/node_modules/.bin/$name" "$bin/$name"; done
ln -sfn "$aider_dir/bin/aider" "$bin/aider"
echo "$bin"
