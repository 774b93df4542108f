#!/bin/sh
# Register each site's SuperNode public key with the SuperLink (run on the coordinator after the
# SuperLink has started, with the "${federation}" connection from flwr-config.toml in
# $$FLWR_HOME/config.toml). A SuperNode whose key is not registered is refused.
set -eu
cd "$$(dirname "$$0")"
${commands}
