#!/usr/bin/env bash
# Installs what the test suite drives for real: Debian's nix-bin and syndicate-server 0.50.1.
# Idempotent: does nothing for a tool that is already on PATH.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"

need_apt=()
command -v nix-store >/dev/null || need_apt+=(nix-bin)
if ! command -v syndicate-server >/dev/null; then
  command -v pkg-config >/dev/null || need_apt+=(pkg-config)
  dpkg -s libssl-dev >/dev/null 2>&1 || need_apt+=(libssl-dev)
fi
if ((${#need_apt[@]})); then
  echo "==> installing Debian packages: ${need_apt[*]} (one time)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v syndicate-server >/dev/null; then
  echo "==> building syndicate-server 0.50.1 with cargo (one time, about 10 minutes on 2 cores)"
  # syndicate-server uses nightly features; nixpkgs builds it with RUSTC_BOOTSTRAP too.
  RUSTC_BOOTSTRAP=1 cargo install syndicate-server --version 0.50.1 --locked --quiet
fi
echo "==> $(nix-store --version); syndicate-server at $(command -v syndicate-server)"
