#!/bin/sh
# Register each site's SuperNode public key with the SuperLink and record which node is which site
# (run on the coordinator after the SuperLink has started, with the "${federation}" connection from
# flwr-config.toml in $$FLWR_HOME/config.toml). A SuperNode whose key is not registered is refused;
# a registered node missing from the record (${registry}) is never enrolled by the ServerApp.
# It registers exactly the sites named in bundle.toml [sites], each with site-keys/<name>.pub.
set -eu
cd "$$(dirname "$$0")"
exec slmfed deploy register-sites . --connection ${federation} --registry ${registry}
