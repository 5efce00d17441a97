#!/usr/bin/env bash
# What the benches need beyond .venv: nginx and its echo module (bench/_static_s3.py serves S3 GETs from it, so
# the S3 rows of bench/dataloader.py measure the client rather than a Python test server). Debian/Ubuntu, root.
set -euo pipefail
if command -v nginx >/dev/null && [ -e /usr/lib/nginx/modules/ngx_http_echo_module.so ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "bench-tools: run as root (apt-get install nginx-light libnginx-mod-http-echo)" >&2
  exit 1
fi
# The packages' install scripts would start a system nginx on port 80; the benches start their own on loopback.
guard=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && guard=1
fi
trap '[ "$guard" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx-light libnginx-mod-http-echo >/dev/null
